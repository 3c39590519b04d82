//! What a file mapping learnt about its file system at `map_file`: which file system it is
//! (`statfs` f_type), and what trying the file lease gave (`docs/file-contract.md` §6, "File
//! systems"). The capability table of the contract says what each one gives hetmem. A leaf of
//! plain data: it imports nothing of the crate, so that `error` can name `LeaseProbe`.

/// A file system, by its `statfs` magic (`f_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Filesystem {
    /// ext2, ext3 or ext4 (one magic for the three).
    Ext4,
    /// XFS.
    Xfs,
    /// Btrfs.
    Btrfs,
    /// tmpfs or shmem (`/dev/shm`): the page cache is the file.
    Tmpfs,
    /// F2FS.
    F2fs,
    /// NFS, any version (v3 and v4 share the magic; the lease probe tells them apart: v3 has
    /// no leases, v4 only with a write delegation).
    Nfs,
    /// FUSE, virtiofs included (one magic): a lease here is local to this kernel.
    Fuse,
    /// overlayfs.
    Overlay,
    /// GFS2.
    Gfs2,
    /// CephFS.
    Ceph,
    /// SMB/CIFS.
    Smb,
    /// 9p (v9fs).
    NineP,
    /// ZFS (OpenZFS).
    Zfs,
    /// bcachefs.
    Bcachefs,
    /// Any other, by its magic.
    Other(u64),
}

/// `statfs` magics, `include/uapi/linux/magic.h` (and ZFS's own).
const MAGICS: &[(u64, Filesystem)] = &[
    (0xef53, Filesystem::Ext4),
    (0x5846_5342, Filesystem::Xfs),
    (0x9123_683e, Filesystem::Btrfs),
    (0x0102_1994, Filesystem::Tmpfs),
    (0xf2f5_2010, Filesystem::F2fs),
    (0x6969, Filesystem::Nfs),
    (0x6573_5546, Filesystem::Fuse),
    (0x794c_7630, Filesystem::Overlay),
    (0x0116_1970, Filesystem::Gfs2),
    (0x00c3_6400, Filesystem::Ceph),
    (0xff53_4d42, Filesystem::Smb),
    (0xfe53_4d42, Filesystem::Smb),
    (0x0102_1997, Filesystem::NineP),
    (0x2fc1_2fc1, Filesystem::Zfs),
    (0xca45_1a4e, Filesystem::Bcachefs),
];

impl Filesystem {
    /// The file system with `statfs` magic `magic`.
    pub fn from_magic(magic: u64) -> Self {
        MAGICS
            .iter()
            .find(|(m, _)| *m == magic)
            .map_or(Filesystem::Other(magic), |&(_, fs)| fs)
    }

    /// Its name, as `/proc/mounts` says it (`ext4` for ext2 and ext3 too, `fuse` for
    /// virtiofs too); "unknown" for [`Filesystem::Other`].
    pub fn name(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
            Filesystem::Btrfs => "btrfs",
            Filesystem::Tmpfs => "tmpfs",
            Filesystem::F2fs => "f2fs",
            Filesystem::Nfs => "nfs",
            Filesystem::Fuse => "fuse",
            Filesystem::Overlay => "overlay",
            Filesystem::Gfs2 => "gfs2",
            Filesystem::Ceph => "ceph",
            Filesystem::Smb => "smb",
            Filesystem::NineP => "9p",
            Filesystem::Zfs => "zfs",
            Filesystem::Bcachefs => "bcachefs",
            Filesystem::Other(_) => "unknown",
        }
    }

    /// Whether every write to a file of this file system goes through this kernel, so that a
    /// lease, once held, is broken by every other writer (contract §6, "File systems"). False
    /// where others write behind its back: other NFS, CephFS, SMB or GFS2 nodes, a FUSE server
    /// or a virtiofs host, another 9p client, a write to an overlayfs layer through its own
    /// path. False for a file system this table does not know.
    pub fn leases_see_every_writer(self) -> bool {
        matches!(
            self,
            Filesystem::Ext4
                | Filesystem::Xfs
                | Filesystem::Btrfs
                | Filesystem::Tmpfs
                | Filesystem::F2fs
                | Filesystem::Zfs
                | Filesystem::Bcachefs
        )
    }
}

/// What trying the file lease at `map_file` gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseProbe {
    /// Taken: the mapping started leased.
    Taken,
    /// Not tried: `FileOptions::lease(false)`, or a Private mapping (which takes none).
    NotAsked,
    /// The file is in use in a way that rules the lease out now (EAGAIN): another open file
    /// description of it (a write lease) or a writer (a read lease), in this process or
    /// another; on NFSv4, no delegation. hetmem tries again at each fault and flush.
    InUse,
    /// The kernel refused leases on this file for good, with this errno: EINVAL where the file
    /// system has none (NFSv3, GFS2, `fs.leases-enable` = 0), EACCES for a file the process
    /// does not own without CAP_LEASE. The mapping stays unleased and does not try again.
    Refused(i32),
    /// No real-time signal is free for leases: the application handles or ignores every one
    /// (hetmem takes the first at its default disposition, from SIGRTMIN+7 on). hetmem takes
    /// no leases in this process.
    SignalInUse,
}

impl LeaseProbe {
    /// The errno of a mapping that required the lease and did not get it:
    /// `Error::NoLease(self).errno()`.
    pub fn errno(self) -> i32 {
        match self {
            LeaseProbe::InUse => libc::EAGAIN,
            LeaseProbe::Refused(e) => e,
            LeaseProbe::SignalInUse => libc::EBUSY,
            LeaseProbe::Taken | LeaseProbe::NotAsked => libc::EINVAL,
        }
    }
}

impl std::fmt::Display for LeaseProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseProbe::Taken => write!(f, "lease taken"),
            LeaseProbe::NotAsked => write!(f, "no lease asked for"),
            LeaseProbe::InUse => write!(f, "the file is in use elsewhere (EAGAIN)"),
            LeaseProbe::Refused(e) => write!(
                f,
                "the kernel refuses leases on this file: {}",
                std::io::Error::from_raw_os_error(*e)
            ),
            LeaseProbe::SignalInUse => write!(
                f,
                "the application uses every real-time signal, none is free for leases (EBUSY)"
            ),
        }
    }
}

/// What `map_file` found out about the file's file system ([`crate::FileMapping::capabilities`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileCapabilities {
    /// The file system, by its `statfs` magic.
    pub filesystem: Filesystem,
    /// The `statfs` magic itself (`f_type`); 0 if `fstatfs` failed.
    pub magic: u64,
    /// What trying the lease gave.
    pub lease: LeaseProbe,
    /// Whether, at `map_file`, the mapping's lease kept it coherent with every writer: the lease
    /// was taken, and the file system is one where every write goes through this kernel
    /// ([`Filesystem::leases_see_every_writer`]). False means the mapping is coherent only
    /// with what its own `flush` and `sync` write (contract §6, "Without a lease").
    pub coherent_with_other_writers: bool,
    /// The real-time signal lease breaks arrive with in this process (read by hetmem's lease
    /// thread only: contract §6), where leases can be had: SIGRTMIN+7 unless the application
    /// handles or ignores it. `None` with [`LeaseProbe::SignalInUse`] and without a probe.
    pub lease_signal: Option<i32>,
    /// Whether hetmem serves the plain SIGIO the kernel sends instead of the lease signal when
    /// the real-time signal queue is full (it then re-checks every lease). False where the
    /// application has a SIGIO handler of its own: hetmem leaves SIGIO to it, and a break
    /// whose signal overflowed waits for lease-break-time (contract §11.2).
    pub overflow_served: bool,
}
