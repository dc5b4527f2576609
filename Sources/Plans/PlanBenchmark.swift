/// Synthetic plans for the validation benchmark (tools/bench-plan-validation) and its test.
public enum PlanBenchmark {
    /// A valid plan with `slots` memslots of 16 MiB each, back to back over one gmem file.
    public static func plan(slots: Int) -> String {
        let slotSize: UInt64 = 16 << 20
        var text = """
            apiVersion: gmigrate/v1
            kind: MigrationPlan
            metadata:
              name: many-slots
            spec:
              source:
                vmm: in-process
              target:
                vmm: in-process
              vm:
                type: default
                vcpus: 4
                guestMemfds:
                  - name: ram
                    size: \(UInt64(slots) * slotSize)
                    flags: [mmap, init-shared]
                memslots:

            """
        for index in 0..<UInt64(slots) {
            text += "      - slot: \(index)\n"
            text += "        guestPhysAddr: 0x\(String(index * slotSize, radix: 16))\n"
            text += "        size: 16Mi\n"
            text += "        guestMemfd: ram\n"
            text += "        offset: \(index * slotSize)\n"
        }
        return text
    }
}

extension PlanBenchmark {
    /// Times the three phases of loading one plan text: YAML composition (libyaml's events into nodes), the strict parse into
    /// a draft, and the rules. Each phase runs on the previous phase's output, so their sum is
    /// one `PlanLoader.load`.
    public static func phases(_ text: String) -> (compose: Duration, parse: Duration, rules: Duration)? {
        let clock = ContinuousClock()
        let start = clock.now
        guard let root = try? PlanNode.compose(text) else { return nil }
        let composed = clock.now
        var parser = PlanParser()
        let draft = parser.parse(root)
        let parsed = clock.now
        var validator = PlanValidator(parser: parser, limits: .reference)
        validator.validate(draft)
        let validated = clock.now
        return (composed - start, parsed - composed, validated - parsed)
    }
}
