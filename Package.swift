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
        .package(url: "https://github.com/hummingbird-project/hummingbird", exact: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus", exact: "2.4.1"),
        .package(url: "https://github.com/apple/swift-log", exact: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", exact: "2.101.3"),
        .package(url: "https://github.com/apple/swift-nio-extras", exact: "1.35.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", exact: "2.13.0"),
    ],
    targets: [
        // Layer 0: the KVM uAPI newer than this host's headers, and non-variadic wrappers.
        .target(name: "CKVM"),
        // libnl-3 and libnl-route-3, found through pkg-config (Debian: libnl-3-dev, libnl-route-3-dev).
        .systemLibrary(
            name: "CNetlink", pkgConfig: "libnl-route-3.0",
            providers: [.apt(["libnl-3-dev", "libnl-route-3-dev"])]),
        // Netlink: KVM's VM lifecycle uevents, and network interface checks (rtnetlink).
        .target(name: "HostNet", dependencies: ["CNetlink"]),
        // The kernel boundary: one protocol, LinuxKVM (real ioctls) and KernelModel (reference model).
        .target(name: "Kernel", dependencies: ["CKVM"]),
        // The guest programs VMMs run: the long-mode guest (assembly beside its bytes) and its reports.
        .target(name: "Guests", dependencies: ["Kernel"], exclude: ["longmode.S"]),
        // The `gmigrate kernel run` script language: parser and runner, on either backend.
        .target(name: "KernelScript", dependencies: ["Kernel"]),
        // Migration plans: strict YAML/JSON parsing with field paths, and the one validator.
        // Plans reads libyaml's event stream (CYaml, which the Yams package builds) into its own nodes.
        .target(name: "Plans", dependencies: ["Kernel", .product(name: "Yams", package: "Yams")]),
        // The durable journal: one CRC-chained, fdatasync'ed append-only log per migration.
        .target(name: "Journal", dependencies: ["CKVM", "Kernel", "Plans"]),
        // The migration: journaled state machine, VMM endpoints, recovery, fault points.
        .target(name: "Orchestrator", dependencies: ["Kernel", "Plans", "Journal", "Guests"]),
        // The handoff protocol between the coordinator and VMM processes (docs/handoff.md).
        .target(name: "Handoff", dependencies: ["CKVM", "Kernel", "Plans", "Journal", "Orchestrator", "HostNet", "Guests"]),
        // The coordinator daemon: HTTP on a UNIX socket (bound or socket-activated) and optionally
        // loopback TCP, authorization, events, metrics.
        .target(
            name: "Coordinator",
            dependencies: [
                "Kernel", "Plans", "Journal", "Orchestrator", "Handoff", "HostNet", "CKVM",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOExtras", package: "swift-nio-extras"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "gmigrate",
            dependencies: [
                "Kernel", "KernelScript", "Plans", "Journal", "Orchestrator", "Handoff", "Coordinator", "HostNet",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // A minimal real VMM that speaks the handoff protocol.
        .executableTarget(
            name: "tinyvmm",
            dependencies: [
                "CKVM", "Kernel", "Plans", "Orchestrator", "Handoff", "Guests",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Benchmark of plan validation: tools/bench-plan-validation.
        .executableTarget(name: "plan-benchmark", dependencies: ["Plans"]),
        // The test kit: the one gate (requireKVM, requireTool, requireNetns...) every test that
        // needs something of the host goes through, and the helpers every test target uses
        // (Tests/GmigrateTestKit/README.md).
        .target(name: "GmigrateTestKit", dependencies: ["Kernel"], path: "Tests/GmigrateTestKit", exclude: ["README.md"]),
        // Fixtures the module test targets share: plans, journal checks, VMM processes and peers
        // (nothing of the daemon).
        .target(
            name: "GmigrateTestSupport", dependencies: ["GmigrateTestKit", "CKVM", "Kernel", "Plans", "Journal", "Orchestrator", "Handoff", "Guests"],
            path: "Tests/GmigrateTestSupport"),
        // One test target per module: each builds and runs with its module's dependencies only
        // (the daemon's, Hummingbird and NIO, only for CoordinatorTests).
        .testTarget(name: "KernelTests", dependencies: ["GmigrateTestKit", "CKVM", "Kernel", "KernelScript"]),
        .testTarget(name: "PlanTests", dependencies: ["GmigrateTestKit", "Kernel", "Plans", .product(name: "Yams", package: "Yams")]),
        .testTarget(name: "JournalTests", dependencies: ["GmigrateTestKit", "GmigrateTestSupport", "Kernel", "Plans", "Journal", "Orchestrator", "Handoff"]),
        .testTarget(name: "OrchestratorTests", dependencies: ["GmigrateTestKit", "GmigrateTestSupport", "Kernel", "Plans", "Journal", "Orchestrator"]),
        .testTarget(
            name: "HandoffTests",
            dependencies: ["GmigrateTestKit", "GmigrateTestSupport", "CKVM", "Kernel", "Plans", "Journal", "Orchestrator", "Handoff", "Guests"]),
        .testTarget(
            name: "CoordinatorTests",
            dependencies: [
                "GmigrateTestKit", "GmigrateTestSupport", "CKVM", "Kernel", "Plans", "Journal", "Orchestrator", "Handoff", "HostNet", "Coordinator",
                .product(name: "Yams", package: "Yams"),
            ]),
        .testTarget(
            name: "HostNetTests",
            dependencies: ["GmigrateTestKit", "GmigrateTestSupport", "Kernel", "Plans", "Journal", "Orchestrator", "Handoff", "HostNet"]),
        .testTarget(name: "CLITests", dependencies: ["GmigrateTestKit", "GmigrateTestSupport", "Kernel", "Plans", "Journal", "Orchestrator"]),
    ],
    swiftLanguageModes: [.v6]
)
