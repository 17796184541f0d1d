//! The process's memory allocator: jemalloc, tuned for what ringlb holds.
//!
//! The control plane keeps a cluster's objects for as long as they exist (10,000 Services and
//! their EndpointSlices are ~100 MB of small allocations) and, at a start or a relist, decodes and
//! drops several times that in a burst. glibc's malloc leaves that burst behind as fragments in
//! one arena per thread that took part (the control thread, the build threads of tokio's blocking
//! pool): ~70 MB above the live heap that no `malloc_trim` gives back. jemalloc, with one arena
//! and pages returned as soon as they are free, holds 30–35 MiB less at 10,000 Services and builds
//! faster (`bench/RESULTS.md`, "Kubernetes sync"). The datapath allocates little after a start
//! (buffers come from rings set up once; connection state is pooled), so one arena costs it
//! nothing measurable, and the thread caches keep the workers off the arena's lock.
//!
//! `_RJEM_MALLOC_CONF` in the environment overrides these options (jemalloc's syntax).

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once, at its first allocation: one arena; free pages back to the
/// system at once (`dirty_decay_ms:0`) rather than kept for reuse for ten seconds.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Options = Options(c"narenas:1,dirty_decay_ms:0,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc reads; `Sync` because it points at a `'static` literal.
#[repr(transparent)]
struct Options(*const std::ffi::c_char);

// SAFETY: the pointer is to an immutable static C string; nothing writes through it.
unsafe impl Sync for Options {}
