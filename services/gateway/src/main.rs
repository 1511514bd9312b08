//! `lmforge-gateway`: the gateway service as a process.

fn main() -> std::process::ExitCode {
    lmforge_runtime::main_entry::run::<lmforge_gateway::Config, _, _, _>(lmforge_gateway::serve)
}
