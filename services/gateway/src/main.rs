//! `lmforge-gateway`: the gateway service as a process.

/// mimalloc: the gateway's work is many small, short-lived allocations across worker threads
/// (requests, JSON, SSE events), where glibc malloc's arena locking costs (`make bench`:
/// gateway benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    lmforge_runtime::main_entry::run::<lmforge_gateway::Config, _, _, _>(lmforge_gateway::serve)
}
