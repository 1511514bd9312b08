//! `lmforge-jobs`: the jobs service as a process.

fn main() -> std::process::ExitCode {
    lmforge_runtime::main_entry::run::<lmforge_jobs::Config, _, _, _>(lmforge_jobs::serve)
}
