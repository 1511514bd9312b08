//! `lmforge-ingest`: the dataset service as a process.

fn main() -> std::process::ExitCode {
    lmforge_runtime::main_entry::run::<lmforge_ingest::Config, _, _, _>(lmforge_ingest::serve)
}
