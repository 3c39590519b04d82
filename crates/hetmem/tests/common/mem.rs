//! Plain memory for the integration tests: mappings the tests make, protect and unmap
//! themselves, outside hetmem.

/// A fresh private anonymous read-write mapping of `len` bytes: memory that is mapped but not
/// managed. Its address.
pub fn anon(len: usize) -> usize {
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap of {len:#x} bytes: {}",
        std::io::Error::last_os_error()
    );
    p as usize
}

/// `anon(len)`, every byte `byte`.
pub fn anon_filled(len: usize, byte: u8) -> usize {
    let p = anon(len);
    // SAFETY: our own fresh mapping, which nothing else references yet.
    unsafe { std::ptr::write_bytes(p as *mut u8, byte, len) };
    p
}

/// munmap, which must succeed.
pub fn munmap(addr: usize, len: usize) {
    // SAFETY: the callers unmap only memory of their own that they no longer reference.
    let r = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    assert_eq!(r, 0, "munmap: {}", std::io::Error::last_os_error());
}

/// mprotect, which must succeed.
pub fn mprotect(addr: usize, len: usize, prot: libc::c_int) {
    // SAFETY: the callers change the protection of their own memory and then access it only
    // as `prot` allows.
    let r = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
    assert_eq!(r, 0, "mprotect: {}", std::io::Error::last_os_error());
}
