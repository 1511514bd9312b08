//! `lmforge-registry`: the registry service as a process.

fn main() -> std::process::ExitCode {
    lmforge_runtime::main_entry::run::<lmforge_registry::Config, _, _, _>(lmforge_registry::serve)
}
