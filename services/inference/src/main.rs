//! `lmforge-inference`: the inference service as a process.

fn main() -> std::process::ExitCode {
    lmforge_runtime::main_entry::run::<lmforge_inference::Config, _, _, _>(lmforge_inference::serve)
}
