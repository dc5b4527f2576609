import CKVM
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A response from the daemon.
public struct HTTPResult: Sendable {
    public var status: Int
    public var headers: [String: String]
    public var body: Data

    public var text: String { String(decoding: body, as: UTF8.self) }
}

public struct ClientError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// A small HTTP/1.1 client for the daemon's UNIX socket (what `gmigrate submit`, `status`,
/// `list`, `cancel` and `watch` use): one request per connection (`Connection: close`),
/// Content-Length and chunked bodies, and server-sent events read as they arrive.
public enum UnixHTTPClient {
    public static func request(
        socket: String, method: String, path: String, headers: [String: String] = [:], body: Data? = nil, timeout: Double = 30
    ) throws -> HTTPResult {
        var result: HTTPResult?
        try exchange(socket: socket, method: method, path: path, headers: headers, body: body, timeout: timeout) { head, chunk in
            if result == nil { result = HTTPResult(status: head.status, headers: head.headers, body: Data()) }
            result?.body.append(chunk)
        }
        guard let result else { throw ClientError(message: "\(socket): no response") }
        return result
    }

    /// Reads `text/event-stream` events until the stream ends; `onEvent(kind, data)`.
    public static func events(socket: String, path: String, onEvent: (String, String) -> Void) throws -> Int {
        var pending = ""
        var status = 0
        try exchange(socket: socket, method: "GET", path: path, headers: ["Accept": "text/event-stream"], body: nil, timeout: 3600) { head, chunk in
            status = head.status
            pending += String(decoding: chunk, as: UTF8.self)
            while let range = pending.range(of: "\n\n") {
                let block = String(pending[..<range.lowerBound])
                pending.removeSubrange(..<range.upperBound)
                var kind = "message"
                var data = ""
                for line in block.split(separator: "\n") {
                    if line.hasPrefix("event: ") { kind = String(line.dropFirst(7)) }
                    if line.hasPrefix("data: ") { data += String(line.dropFirst(6)) }
                }
                onEvent(kind, data)
            }
        }
        return status
    }

    struct Head {
        var status: Int
        var headers: [String: String]
    }

    private static func exchange(
        socket: String, method: String, path: String, headers: [String: String], body: Data?, timeout: Double,
        onData: (Head, Data) -> Void
    ) throws {
        let fd = ckvm_connect_unix(socket)
        guard fd >= 0 else {
            throw ClientError(message: "cannot connect to the daemon at \(socket): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        _ = ckvm_set_timeouts(fd, Int(timeout * 1000))
        var request = "\(method) \(path) HTTP/1.1\r\nHost: gmigrate\r\nConnection: close\r\n"
        for (name, value) in headers { request += "\(name): \(value)\r\n" }
        request += "Content-Length: \(body?.count ?? 0)\r\n\r\n"
        var bytes = Data(request.utf8)
        if let body { bytes.append(body) }
        let sent = bytes.withUnsafeBytes { ckvm_send_with_fds(fd, $0.baseAddress, UInt($0.count), nil, 0) }
        guard sent == 0 else { throw ClientError(message: "sending to \(socket): \(String(cString: strerror(errno)))") }

        var buffer = Data()
        var head: Head?
        var chunked = false
        var remainingInChunk = 0
        var scratch = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = read(fd, &scratch, scratch.count)
            if count < 0 {
                if errno == EINTR { continue }
                throw ClientError(message: "reading from \(socket): \(String(cString: strerror(errno)))")
            }
            if count == 0 { break }
            buffer.append(contentsOf: scratch[0..<count])
            if head == nil {
                guard let end = buffer.range(of: Data("\r\n\r\n".utf8)) else { continue }
                let lines = String(decoding: buffer[..<end.lowerBound], as: UTF8.self).components(separatedBy: "\r\n")
                let status = Int(lines.first?.split(separator: " ").dropFirst().first ?? "") ?? 0
                var fields: [String: String] = [:]
                for line in lines.dropFirst() {
                    guard let colon = line.firstIndex(of: ":") else { continue }
                    fields[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
                }
                head = Head(status: status, headers: fields)
                chunked = fields["transfer-encoding"]?.lowercased().contains("chunked") ?? false
                buffer.removeSubrange(..<end.upperBound)
                onData(Head(status: status, headers: fields), Data())
            }
            guard let head else { continue }
            if !chunked {
                onData(head, buffer)
                buffer.removeAll()
                continue
            }
            // Chunked: <hex size>\r\n<data>\r\n ... 0\r\n\r\n
            while true {
                if remainingInChunk > 0 {
                    let take = min(remainingInChunk, buffer.count)
                    if take == 0 { break }
                    onData(head, buffer.prefix(take))
                    buffer.removeFirst(take)
                    remainingInChunk -= take
                    if remainingInChunk == 0 { remainingInChunk = -2 }  // expect CRLF
                    continue
                }
                if remainingInChunk == -2 {
                    guard buffer.count >= 2 else { break }
                    buffer.removeFirst(2)
                    remainingInChunk = 0
                    continue
                }
                guard let lineEnd = buffer.range(of: Data("\r\n".utf8)) else { break }
                let sizeText = String(decoding: buffer[..<lineEnd.lowerBound], as: UTF8.self).split(separator: ";").first ?? ""
                guard let size = Int(sizeText.trimmingCharacters(in: .whitespaces), radix: 16) else {
                    throw ClientError(message: "a malformed chunked response")
                }
                buffer.removeSubrange(..<lineEnd.upperBound)
                if size == 0 { return }
                remainingInChunk = size
            }
        }
    }
}
