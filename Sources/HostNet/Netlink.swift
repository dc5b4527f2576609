// The only file of HostNet that calls libnl (style lesson 1): a uevent socket, and the link
// table through rtnetlink.

import CNetlink
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Why netlink could not be used; keeps libnl's error code.
public struct NetlinkError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public var code: Int32
    public init(_ message: String, code: Int32) {
        self.message = message
        self.code = code
    }
    public var description: String { message }
}

/// A NETLINK_KOBJECT_UEVENT socket joined to the kernel's uevent group.
final class UeventSocket: @unchecked Sendable {
    // @unchecked: used by the watcher's one thread after init.
    private let socket: OpaquePointer

    init() throws(NetlinkError) {
        guard let socket = nl_socket_alloc() else { throw NetlinkError("nl_socket_alloc failed", code: -1) }
        nl_socket_disable_seq_check(socket)
        nl_join_groups(socket, 1)
        let result = nl_connect(socket, NETLINK_KOBJECT_UEVENT)
        guard result == 0 else {
            nl_socket_free(socket)
            throw NetlinkError("connecting the uevent socket: \(String(cString: nl_geterror(result)))", code: result)
        }
        self.socket = socket
    }

    deinit { nl_socket_free(socket) }

    var fd: Int32 { nl_socket_get_fd(socket) }

    /// Waits up to `timeout` for one uevent; its `KEY=VALUE` variables (nil on timeout).
    func receive(timeout milliseconds: Int32) -> [String: String]? {
        var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, milliseconds) > 0 else { return nil }
        var peer = sockaddr_nl()
        var buffer: UnsafeMutablePointer<UInt8>? = nil
        let length = nl_recv(socket, &peer, &buffer, nil)
        defer { free(buffer) }
        guard length > 0, let buffer else { return nil }
        var variables: [String: String] = [:]
        // "ACTION@DEVPATH\0KEY=VALUE\0KEY=VALUE\0..."
        for field in UnsafeBufferPointer(start: buffer, count: Int(length)).split(separator: 0) {
            let text = String(decoding: field, as: UTF8.self)
            if let equals = text.firstIndex(of: "=") {
                variables[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
        }
        return variables
    }
}

/// One network interface, as rtnetlink describes it.
public struct LinkInfo: Sendable, Equatable, Codable {
    public var name: String
    public var index: Int32
    public var isUp: Bool
    public var mtu: UInt32
    /// The bridge (or other master) it is attached to.
    public var master: String?
    /// IFLA_INFO_KIND: `tun` for a tap, `bridge`, `veth`, ...
    public var kind: String?
}

private final class LinkCollector {
    var links: [LinkInfo] = []
}

/// Reads every interface of this network namespace through rtnetlink.
public func readLinks() throws(NetlinkError) -> [LinkInfo] {
    guard let socket = nl_socket_alloc() else { throw NetlinkError("nl_socket_alloc failed", code: -1) }
    defer { nl_socket_free(socket) }
    let connected = nl_connect(socket, NETLINK_ROUTE)
    guard connected == 0 else { throw NetlinkError("connecting rtnetlink: \(String(cString: nl_geterror(connected)))", code: connected) }
    var cache: OpaquePointer? = nil
    let allocated = rtnl_link_alloc_cache(socket, AF_UNSPEC, &cache)
    guard allocated == 0, let cache else {
        throw NetlinkError("reading the link table: \(String(cString: nl_geterror(allocated)))", code: allocated)
    }
    defer { nl_cache_free(cache) }
    let collector = LinkCollector()
    let callback: @convention(c) (OpaquePointer?, UnsafeMutableRawPointer?) -> Void = { object, context in
        guard let object, let context else { return }
        let collector = Unmanaged<LinkCollector>.fromOpaque(context).takeUnretainedValue()
        let name = rtnl_link_get_name(object).map { String(cString: $0) } ?? ""
        let master = rtnl_link_get_master(object)
        let kind = rtnl_link_get_type(object).map { String(cString: $0) }
        collector.links.append(LinkInfo(
            name: name, index: rtnl_link_get_ifindex(object), isUp: rtnl_link_get_flags(object) & UInt32(IFF_UP) != 0,
            mtu: rtnl_link_get_mtu(object), master: master > 0 ? "#\(master)" : nil, kind: kind))
    }
    withExtendedLifetime(collector) {
        nl_cache_foreach(cache, callback, Unmanaged.passUnretained(collector).toOpaque())
    }
    let names = Dictionary(collector.links.map { ("#\($0.index)", $0.name) }, uniquingKeysWith: { first, _ in first })
    return collector.links.map { link in
        var link = link
        if let master = link.master { link.master = names[master] ?? master }
        return link
    }
}
