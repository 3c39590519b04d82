//! Temporary directories and file systems for the file-mapping tests (`tests/file_*.rs`,
//! `tests/file_contract.rs`).

#![allow(unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, ensure, Context, Result};

/// A fresh directory under `std::env::temp_dir()`, removed with its contents on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("hetmem-file-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file system mounted at a directory; unmounted on drop (also when the test fails).
pub struct Mount(pub PathBuf);

impl Mount {
    /// Mounts a tmpfs with `opts` at `dir`, or prints SKIPPED and returns None if the mount is
    /// refused.
    pub fn tmpfs(dir: &Path, opts: &str) -> Result<Option<Self>> {
        let target = cstr(dir)?;
        let opts_c = std::ffi::CString::new(opts)?;
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts_c.as_ptr().cast(),
            )
        };
        if r != 0 {
            eprintln!(
                "SKIPPED: mount -t tmpfs -o {opts} {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
            return Ok(None);
        }
        Ok(Some(Self(dir.to_path_buf())))
    }

    /// Makes a `fs` file system (ext4, xfs) in a sparse image of `mib` MiB and mounts it at
    /// `dir` through a loop device. Prints SKIPPED and returns None where that cannot be done
    /// here (no mkfs for it, no loop devices).
    pub fn image(image: &Path, dir: &Path, fs: &str, mib: u64) -> Result<Option<Self>> {
        Self::image_with(image, dir, fs, mib, "")
    }

    /// `image` with mount options `opts` (none if empty).
    pub fn image_with(
        image: &Path,
        dir: &Path,
        fs: &str,
        mib: u64,
        opts: &str,
    ) -> Result<Option<Self>> {
        File::create(image)?.set_len(mib << 20)?;
        let mkfs = format!("mkfs.{fs}");
        let force = if fs == "xfs" { "-f" } else { "-F" };
        match std::process::Command::new(&mkfs)
            .args(["-q", force])
            .arg(image)
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => bail!("{mkfs}: {out:?}"),
            Err(e) => {
                eprintln!("SKIPPED: {fs}: cannot run {mkfs} ({e}); .ci/run installs it");
                return Ok(None);
            }
        }
        Self::existing_image(image, dir, fs, opts)
    }

    /// Mounts the `fs` file system in `image` at `dir` through a loop device, with mount
    /// options `opts` (none if empty). Prints SKIPPED and returns None if the mount is refused.
    pub fn existing_image(image: &Path, dir: &Path, fs: &str, opts: &str) -> Result<Option<Self>> {
        let opts = if opts.is_empty() {
            "loop".to_string()
        } else {
            format!("loop,{opts}")
        };
        let out = std::process::Command::new("mount")
            .args(["-t", fs, "-o", &opts])
            .arg(image)
            .arg(dir)
            .output()
            .context("run mount(8)")?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: {fs}: mount -o loop: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Ok(None);
        }
        Ok(Some(Self(dir.to_path_buf())))
    }

    /// Remounts a tmpfs with `opts`.
    pub fn remount(&self, opts: &str) -> Result<()> {
        let target = cstr(&self.0)?;
        let opts_c = std::ffi::CString::new(opts)?;
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_REMOUNT,
                opts_c.as_ptr().cast(),
            )
        };
        ensure!(
            r == 0,
            "remount {opts}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(target) = cstr(&self.0) {
            // A plain unmount frees a loop device at once; detach only if something is busy.
            if unsafe { libc::umount2(target.as_ptr(), 0) } != 0
                && unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0
            {
                eprintln!(
                    "umount {}: {}",
                    self.0.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

pub fn cstr(p: &Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    Ok(std::ffi::CString::new(p.as_os_str().as_bytes())?)
}
