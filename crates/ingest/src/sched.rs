//! Scheduling of the loader's threads.
//!
//! The loader's writer is its one serial stage: everything before it (decompressing, parsing,
//! validating, indexing) runs on as many threads as there are cores, so on a small machine the
//! writer shares a core with parsing threads that are already ahead of it, and the load runs at
//! the writer's share of a core. Parsing threads therefore lower their own priority: they use
//! whatever CPU the writer leaves, and can never starve it.

/// How much lower parsing threads run than the writer (a `nice` increment).
#[cfg(target_os = "linux")]
const PARSER_NICE: i32 = 10;

/// Lower the calling thread's scheduling priority (best effort: a failure changes nothing but
/// speed, so it is ignored). On Linux the nice value is a per-thread attribute; elsewhere this
/// does nothing.
pub(crate) fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `getpriority`/`setpriority` read and write a scheduling attribute of the calling
        // thread (`who` = 0); they touch no memory of ours. `errno` is reset first because -1 is
        // also a valid priority.
        unsafe {
            *libc::__errno_location() = 0;
            let current = libc::getpriority(libc::PRIO_PROCESS, 0);
            if current == -1 && *libc::__errno_location() != 0 {
                return;
            }
            libc::setpriority(libc::PRIO_PROCESS, 0, (current + PARSER_NICE).min(19));
        }
    }
}
