fn main() -> std::process::ExitCode {
    homelab::cli::main()
}
