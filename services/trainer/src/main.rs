//! `lmforge-trainer`: the trainer service as a process.

fn main() -> std::process::ExitCode {
    lmforge_runtime::main_entry::run::<lmforge_trainer::Config, _, _, _>(lmforge_trainer::serve)
}
