import CYaml

/// A YAML (or JSON) node as the plan parser reads it: text, a mapping in file order, or a list;
/// each with its place in the file. A mapping keeps a key given twice, so that the parser
/// reports every one with its path; aliases are resolved to the anchored node.
///
/// Built straight from libyaml's event stream (`PlanNode.compose`), without Yams' node tree,
/// tags and resolver: a plan needs none of them, and a 4096-slot plan composes several times
/// faster (tools/bench-plan-validation).
struct PlanNode {
    enum Content {
        case scalar(String)
        case mapping([(key: PlanNode, value: PlanNode)])
        case sequence([PlanNode])
    }

    var content: Content
    /// 1-based, as editors count.
    var line: Int
    var column: Int

    var string: String? {
        if case .scalar(let text) = content { return text }
        return nil
    }

    /// The value of the first key `name` of a mapping.
    subscript(name: String) -> PlanNode? {
        guard case .mapping(let pairs) = content else { return nil }
        return pairs.first { $0.key.string == name }?.value
    }

    var sequence: [PlanNode]? {
        if case .sequence(let items) = content { return items }
        return nil
    }

    /// Why a text is not one YAML document: libyaml's problem and its place.
    struct SyntaxError: Error, Equatable {
        var message: String
        var line: Int?
        var column: Int?
    }

    /// Deeper nesting than any plan has is refused (the composer recurses once per level).
    static let maxDepth = 64
    /// Aliases may repeat a subtree; more nodes than this in all is refused (an alias bomb).
    static let maxNodes = 1 << 20

    /// The one document of `text`, or nil for an empty stream.
    static func compose(_ text: String) throws(SyntaxError) -> PlanNode? {
        var copy = text
        let result: Result<PlanNode?, SyntaxError> = copy.withUTF8 { bytes in
            var composer = Composer()
            defer { composer.close() }
            yaml_parser_set_input_string(composer.parser, bytes.baseAddress, bytes.count)
            do throws(SyntaxError) {
                return .success(try composer.document())
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    /// Reads libyaml's events into nodes.
    private struct Composer {
        let parser: UnsafeMutablePointer<yaml_parser_t>
        /// Each anchored node, its size in nodes and its height in levels: an alias adds both.
        var anchors: [String: (node: PlanNode, count: Int, height: Int)] = [:]
        var nodes = 0

        init() {
            parser = .allocate(capacity: 1)
            parser.initialize(to: yaml_parser_t())
            yaml_parser_initialize(parser)
            yaml_parser_set_encoding(parser, YAML_UTF8_ENCODING)
        }

        func close() {
            yaml_parser_delete(parser)
            parser.deallocate()
        }

        enum Event {
            case streamStart, streamEnd, documentEnd, sequenceEnd, mappingEnd
            case documentStart(line: Int, column: Int)
            case alias(String, line: Int, column: Int)
            case scalar(String, anchor: String?, line: Int, column: Int)
            case sequenceStart(anchor: String?, line: Int, column: Int)
            case mappingStart(anchor: String?, line: Int, column: Int)
        }

        func error() -> SyntaxError {
            let problem = parser.pointee.problem.map { String(cString: $0) } ?? "malformed YAML"
            switch parser.pointee.error {
            case YAML_READER_ERROR:
                return SyntaxError(message: "\(problem) at byte \(parser.pointee.problem_offset)")
            case YAML_MEMORY_ERROR:
                return SyntaxError(message: "out of memory")
            default:
                var message = problem
                if let context = parser.pointee.context {
                    let mark = parser.pointee.context_mark
                    message += " (\(String(cString: context)) at \(mark.line + 1):\(mark.column + 1))"
                }
                let mark = parser.pointee.problem_mark
                return SyntaxError(message: message, line: mark.line + 1, column: mark.column + 1)
            }
        }

        private static func text(_ pointer: UnsafeMutablePointer<yaml_char_t>?) -> String? {
            pointer.map { String(cString: $0) }
        }

        func next() throws(SyntaxError) -> Event {
            var event = yaml_event_t()
            guard yaml_parser_parse(parser, &event) == 1 else { throw error() }
            defer { yaml_event_delete(&event) }
            let line = event.start_mark.line + 1
            let column = event.start_mark.column + 1
            switch event.type {
            case YAML_STREAM_START_EVENT: return .streamStart
            case YAML_STREAM_END_EVENT: return .streamEnd
            case YAML_DOCUMENT_START_EVENT: return .documentStart(line: line, column: column)
            case YAML_DOCUMENT_END_EVENT: return .documentEnd
            case YAML_SEQUENCE_END_EVENT: return .sequenceEnd
            case YAML_MAPPING_END_EVENT: return .mappingEnd
            case YAML_ALIAS_EVENT:
                return .alias(Composer.text(event.data.alias.anchor) ?? "", line: line, column: column)
            case YAML_SCALAR_EVENT:
                let scalar = event.data.scalar
                // libyaml has checked the input as UTF-8, and gives scalars as UTF-8.
                let value = scalar.value.map { String(decoding: UnsafeBufferPointer(start: $0, count: scalar.length), as: UTF8.self) } ?? ""
                return .scalar(value, anchor: Composer.text(scalar.anchor), line: line, column: column)
            case YAML_SEQUENCE_START_EVENT:
                return .sequenceStart(anchor: Composer.text(event.data.sequence_start.anchor), line: line, column: column)
            case YAML_MAPPING_START_EVENT:
                return .mappingStart(anchor: Composer.text(event.data.mapping_start.anchor), line: line, column: column)
            default:
                throw SyntaxError(message: "an unexpected YAML event", line: line, column: column)
            }
        }

        mutating func document() throws(SyntaxError) -> PlanNode? {
            guard case .streamStart = try next() else { throw SyntaxError(message: "the YAML stream does not start") }
            switch try next() {
            case .streamEnd: return nil
            case .documentStart: break
            default: throw SyntaxError(message: "the YAML stream has no document")
            }
            let root = try node(try next(), depth: 0).node
            guard case .documentEnd = try next() else { throw SyntaxError(message: "the YAML document does not end") }
            switch try next() {
            case .streamEnd: return root
            case .documentStart(let line, let column):
                throw SyntaxError(message: "expected a single document in the stream, but found another document", line: line, column: column)
            default:
                throw SyntaxError(message: "the YAML stream does not end")
            }
        }

        private mutating func count(_ added: Int, line: Int, column: Int) throws(SyntaxError) {
            nodes += added
            guard nodes <= PlanNode.maxNodes else {
                throw SyntaxError(message: "the document expands to more than \(PlanNode.maxNodes) nodes (aliases)", line: line, column: column)
            }
        }

        private mutating func register(_ anchor: String?, _ node: PlanNode, count: Int, height: Int) {
            if let anchor { anchors[anchor] = (node, count, height) }
        }

        private static func tooDeep(line: Int, column: Int) -> SyntaxError {
            SyntaxError(message: "nested deeper than \(PlanNode.maxDepth) levels", line: line, column: column)
        }

        /// One node and, for a collection, everything in it, with its height in levels (an
        /// anchor remembers its size in nodes and its height, which each alias of it adds again:
        /// aliases cannot build a tree deeper or larger than the bounds).
        private mutating func node(_ event: Event, depth: Int) throws(SyntaxError) -> (node: PlanNode, height: Int) {
            let before = nodes
            switch event {
            case .scalar(let value, let anchor, let line, let column):
                try count(1, line: line, column: column)
                // A scalar adds no level: only collections are held to the bound, written or aliased.
                let node = PlanNode(content: .scalar(value), line: line, column: column)
                register(anchor, node, count: 1, height: 0)
                return (node, 0)
            case .alias(let name, let line, let column):
                guard let (node, size, height) = anchors[name] else {
                    throw SyntaxError(message: "found undefined alias '\(name)'", line: line, column: column)
                }
                guard depth + height <= PlanNode.maxDepth else { throw Composer.tooDeep(line: line, column: column) }
                try count(size, line: line, column: column)
                return (node, height)
            case .sequenceStart(let anchor, let line, let column):
                guard depth < PlanNode.maxDepth else { throw Composer.tooDeep(line: line, column: column) }
                try count(1, line: line, column: column)
                var items: [PlanNode] = []
                var height = 1
                while true {
                    let event = try next()
                    if case .sequenceEnd = event { break }
                    let item = try node(event, depth: depth + 1)
                    items.append(item.node)
                    height = max(height, item.height + 1)
                }
                let node = PlanNode(content: .sequence(items), line: line, column: column)
                register(anchor, node, count: nodes - before, height: height)
                return (node, height)
            case .mappingStart(let anchor, let line, let column):
                guard depth < PlanNode.maxDepth else { throw Composer.tooDeep(line: line, column: column) }
                try count(1, line: line, column: column)
                var pairs: [(key: PlanNode, value: PlanNode)] = []
                var height = 1
                while true {
                    let event = try next()
                    if case .mappingEnd = event { break }
                    let key = try node(event, depth: depth + 1)
                    let value = try node(try next(), depth: depth + 1)
                    pairs.append((key.node, value.node))
                    height = max(height, key.height + 1, value.height + 1)
                }
                let node = PlanNode(content: .mapping(pairs), line: line, column: column)
                register(anchor, node, count: nodes - before, height: height)
                return (node, height)
            default:
                throw SyntaxError(message: "an unexpected YAML event")
            }
        }
    }
}
