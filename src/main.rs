use clap::Parser;
use obelisk::cli::{run, Cli};

/// glibc serves every allocation above 128 kB–32 MB with a fresh `mmap` and gives it back on
/// free, so each of the thousands of short-lived tensors of a registration is page-faulted in
/// anew: a third of a 96³ registration's CPU time went to the kernel. Keeping freed memory in
/// the heap removes that cost for a little more peak memory.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // the largest threshold glibc accepts on 64-bit systems
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // the whole anyhow chain on one line: scripts and users grep for the file name
        let msg = e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ");
        eprintln!("error: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
