fn main() -> std::process::ExitCode {
    bitbucket_auth_proxy::cli::main()
}
