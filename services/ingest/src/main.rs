//! `lmforge-ingest`: the dataset service as a process.

/// mimalloc: the pipeline makes many small, short-lived allocations per record on every
/// worker thread, where glibc malloc's arenas cost about a fifth of the time (`make bench`:
/// ingest benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    lmforge_runtime::main_entry::run::<lmforge_ingest::Config, _, _, _>(lmforge_ingest::serve)
}
