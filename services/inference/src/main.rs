//! `lmforge-inference`: the inference service as a process.

fn main() -> std::process::ExitCode {
    // glibc malloc settings that spare every engine step its page faults (see alloc_tuning).
    if let Some(code) = lmforge_model::alloc_tuning::reexec_with_tuned_malloc() {
        return std::process::ExitCode::from(code.clamp(0, 255) as u8);
    }
    lmforge_runtime::main_entry::run::<lmforge_inference::Config, _, _, _>(lmforge_inference::serve)
}
