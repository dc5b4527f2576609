// Measures `PlanLoader.load` (parse + validate) on synthetic plans of growing size and prints
// the median, minimum and maximum of several runs. Run it in release mode:
//   swift run -c release plan-benchmark [RUNS]
//   plan-benchmark --emit SLOTS     prints the synthetic plan of SLOTS memslots (for timing the
//                                   whole `gmigrate plan validate` process on it)
import Foundation
import Plans

if CommandLine.arguments.count == 3, CommandLine.arguments[1] == "--emit", let slots = Int(CommandLine.arguments[2]), slots >= 0 {
    print(PlanBenchmark.plan(slots: slots), terminator: "")
    exit(0)
}
let runs = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 15 : 15
print("slots  median_ms  min_ms  max_ms  per_slot_us  (\(runs) runs each)")
var medians: [Int: Double] = [:]
for slots in [64, 512, 4096, 16384] {
    let text = PlanBenchmark.plan(slots: slots)
    var times: [Double] = []
    for _ in 0..<runs {
        let start = ContinuousClock.now
        let report = PlanLoader.load(text: text, file: "bench.yaml")
        let elapsed = ContinuousClock.now - start
        guard report.valid else { fatalError("the synthetic plan must be valid: \(report.diagnostics)") }
        let (seconds, attoseconds) = elapsed.components
        times.append(Double(seconds) * 1000 + Double(attoseconds) / 1e15)
    }
    times.sort()
    let median = times[times.count / 2]
    medians[slots] = median
    print(String(format: "%5d  %9.2f  %6.2f  %6.2f  %11.2f", slots, median, times[0], times[times.count - 1], median * 1000 / Double(slots)))
}
if let small = medians[512], let large = medians[4096] {
    print(String(format: "ratio 4096/512 slots: %.1fx for 8x the slots (linear is 8x, pairwise would be 64x)", large / small))
}

// Where the time goes, for 4096 slots: YAML composition (Yams/libyaml), the strict parse, the rules.
do {
    let text = PlanBenchmark.plan(slots: 4096)
    var phases: [[Double]] = [[], [], []]
    for _ in 0..<runs {
        guard let (compose, parse, rules) = PlanBenchmark.phases(text) else { fatalError("the synthetic plan must parse") }
        for (index, phase) in [compose, parse, rules].enumerated() {
            let (seconds, attoseconds) = phase.components
            phases[index].append(Double(seconds) * 1000 + Double(attoseconds) / 1e15)
        }
    }
    let medians = phases.map { $0.sorted()[$0.count / 2] }
    print(String(format: "4096 slots by phase (median ms): yaml compose %.2f, parse %.2f, rules %.2f", medians[0], medians[1], medians[2]))
}
