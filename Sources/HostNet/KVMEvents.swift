import Foundation

/// A KVM VM lifecycle uevent (`kvm_uevent_notify_change`).
public struct KVMEvent: Sendable, Equatable, Codable {
    public enum Kind: String, Sendable, Codable {
        case create
        case destroy
    }

    public var kind: Kind
    /// The pid of the task that created the VM (reused at destroy).
    public var pid: Int32
    public var statsPath: String?
    /// VMs alive now (COUNT), and ever created (CREATED).
    public var count: Int?
    public var created: Int?
    /// When this process received it.
    public var received: Date

    /// Parses a uevent's variables; nil unless it is KVM's.
    public init?(_ variables: [String: String], received: Date = Date()) {
        guard let event = variables["EVENT"], let kind = Kind(rawValue: event),
            variables["DEVPATH"]?.hasSuffix("/misc/kvm") ?? (variables["SUBSYSTEM"] == "misc"),
            let pidText = variables["PID"], let pid = Int32(pidText)
        else { return nil }
        self.kind = kind
        self.pid = pid
        statsPath = variables["STATS_PATH"]
        count = variables["COUNT"].flatMap { Int($0) }
        created = variables["CREATED"].flatMap { Int($0) }
        self.received = received
    }
}

/// Watches KVM's uevents on a thread of its own and hands each to the current subscribers.
/// Best effort, as the kernel's own uevents are: an event dropped under memory pressure is
/// never seen, so the orchestrator keeps its timeouts.
public final class KVMEventWatcher: @unchecked Sendable {
    // @unchecked: the subscriber table and the stop flag are guarded by `lock`.
    private let socket: UeventSocket
    private let lock = NSLock()
    private var subscribers: [UUID: @Sendable (KVMEvent) -> Void] = [:]
    private var stopped = false

    /// Opens the uevent socket and starts the watching thread.
    public init() throws(NetlinkError) {
        socket = try UeventSocket()
        let thread = Thread { [self] in loop() }
        thread.name = "kvm-uevents"
        thread.start()
    }

    deinit { stop() }

    public func stop() { lock.withLock { stopped = true } }

    /// Calls `handler` for every KVM event from now on; returns a token for `unsubscribe`.
    @discardableResult
    public func subscribe(_ handler: @escaping @Sendable (KVMEvent) -> Void) -> UUID {
        let token = UUID()
        lock.withLock { subscribers[token] = handler }
        return token
    }

    public func unsubscribe(_ token: UUID) { _ = lock.withLock { subscribers.removeValue(forKey: token) } }

    private func loop() {
        while !lock.withLock({ stopped }) {
            guard let variables = socket.receive(timeout: 200), let event = KVMEvent(variables) else { continue }
            for handler in lock.withLock({ Array(subscribers.values) }) { handler(event) }
        }
    }
}
