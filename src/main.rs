fn main() -> std::process::ExitCode {
    opsagent::cli::main()
}
