// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "gmigrate",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "gmigrate", targets: ["gmigrate"]),
        .executable(name: "tinyvmm", targets: ["tinyvmm"]),
        .library(name: "Kernel", targets: ["Kernel"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", exact: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams", exact: "6.2.2"),
    ],
    targets: [
        // Layer 0: the KVM uAPI newer than this host's headers, and non-variadic wrappers.
        .target(name: "CKVM"),
        // The kernel boundary: one protocol, LinuxKVM (real ioctls) and KernelModel (reference model).
        .target(name: "Kernel", dependencies: ["CKVM"]),
        // The `gmigrate kernel run` script language: parser and runner, on either backend.
        .target(name: "KernelScript", dependencies: ["Kernel"]),
        // Migration plans: strict YAML/JSON parsing with field paths, and the one validator.
        .target(name: "Plans", dependencies: ["Kernel", .product(name: "Yams", package: "Yams")]),
        // The durable journal: one CRC-chained, fdatasync'ed append-only log per migration.
        .target(name: "Journal", dependencies: ["Kernel", "Plans"]),
        // The migration: journaled state machine, VMM endpoints, recovery, fault points.
        .target(name: "Orchestrator", dependencies: ["Kernel", "Plans", "Journal"]),
        // The handoff protocol between the coordinator and VMM processes (docs/handoff.md).
        .target(name: "Handoff", dependencies: ["CKVM", "Kernel", "Plans", "Journal", "Orchestrator"]),
        .executableTarget(
            name: "gmigrate",
            dependencies: [
                "Kernel", "KernelScript", "Plans", "Journal", "Orchestrator", "Handoff",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // A minimal real VMM that speaks the handoff protocol.
        .executableTarget(
            name: "tinyvmm",
            dependencies: [
                "CKVM", "Kernel", "Plans", "Orchestrator", "Handoff",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Benchmark of plan validation: tools/bench-plan-validation.
        .executableTarget(name: "plan-benchmark", dependencies: ["Plans"]),
        .testTarget(
            name: "KernelTests",
            dependencies: [
                "Kernel", "KernelScript", "Plans", "Journal", "Orchestrator", "Handoff", "CKVM", "gmigrate", "tinyvmm", .product(name: "Yams", package: "Yams"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
