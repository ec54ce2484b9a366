fn main() -> std::process::ExitCode {
    // As /init of the installer's initramfs, the binary is the install agent.
    if std::process::id() == 1 {
        homelab::agent::main_as_init();
    }
    homelab::cli::main()
}
