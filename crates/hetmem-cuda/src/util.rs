//! Pure helpers: rounding, range checks, and reading `/proc/self/maps`. No unsafe, no driver.

use crate::error::{Error, Result};

/// Rounds `n` up to a multiple of `align` (a power of two). `None` on overflow.
pub fn round_up(n: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    Some(n.checked_add(align - 1)? & !(align - 1))
}

/// Whether `n` is a multiple of `align` (a power of two).
pub fn is_aligned(n: u64, align: usize) -> bool {
    debug_assert!(align.is_power_of_two());
    n & (align as u64 - 1) == 0
}

/// Checks that `[offset, offset + len)` lies inside an object of `total` bytes and is not empty.
pub fn check_range(what: &str, offset: usize, len: usize, total: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::Invalid(format!(
            "{what}: empty range at offset {offset}"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= total => Ok(()),
        _ => Err(Error::Invalid(format!(
            "{what}: range [{offset:#x}, +{len:#x}) is outside its {total:#x} bytes"
        ))),
    }
}

/// The system page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// One line of `/proc/self/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `rwxp`/`rwxs` as the kernel prints it.
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    /// Inode of the file mapped (0 for anonymous memory).
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `/memfd:name (deleted)`), or empty.
    pub name: String,
}

/// Parses the text of `/proc/<pid>/maps`; lines that do not parse are skipped.
pub fn parse_maps(text: &str) -> Vec<MapsEntry> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<MapsEntry> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?.to_string();
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let _dev = fields.next()?;
    let inode = fields.next()?.parse().ok()?;
    let name = fields.collect::<Vec<_>>().join(" ");
    let (start, end) = range.split_once('-')?;
    Some(MapsEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms,
        offset,
        inode,
        name,
    })
}

/// The entries that overlap `[addr, addr + len)`.
pub fn maps_overlapping(entries: &[MapsEntry], addr: u64, len: u64) -> Vec<MapsEntry> {
    let end = addr.saturating_add(len);
    entries
        .iter()
        .filter(|e| e.start < end && e.end > addr)
        .cloned()
        .collect()
}

/// Whether `[addr, addr + len)` is mapped, without holes, read-write and shared, from the file
/// with inode `inode` starting at file offset `file_offset`.
pub fn maps_show_shared_file(
    entries: &[MapsEntry],
    addr: u64,
    len: u64,
    inode: u64,
    file_offset: u64,
) -> bool {
    let mut at = addr;
    let end = addr.saturating_add(len);
    let mut over = maps_overlapping(entries, addr, len);
    over.sort_by_key(|e| e.start);
    for e in over {
        if e.start > at {
            return false; // a hole
        }
        let expected = file_offset + (e.start.max(addr) - addr);
        let offset_here = e.offset + (e.start.max(addr) - e.start);
        if !e.perms.starts_with("rw") || !e.perms.ends_with('s') || e.inode != inode {
            return false;
        }
        if offset_here != expected {
            return false;
        }
        at = e.end;
    }
    at >= end
}

/// Reads and parses `/proc/self/maps`.
pub fn read_self_maps() -> Result<Vec<MapsEntry>> {
    let text = std::fs::read_to_string("/proc/self/maps").map_err(|source| Error::Os {
        call: "read /proc/self/maps",
        source,
    })?;
    Ok(parse_maps(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding() {
        assert_eq!(round_up(0, 4096), Some(0));
        assert_eq!(round_up(1, 4096), Some(4096));
        assert_eq!(round_up(4096, 4096), Some(4096));
        assert_eq!(round_up(3 << 20, 2 << 20), Some(4 << 20));
        assert_eq!(round_up(usize::MAX - 10, 4096), None);
        assert!(is_aligned(0x2_0000_0000, 2 << 20));
        assert!(!is_aligned(0x2_0000_1000, 2 << 20));
    }

    #[test]
    fn ranges() {
        assert!(check_range("x", 0, 10, 10).is_ok());
        assert!(check_range("x", 5, 5, 10).is_ok());
        assert!(matches!(check_range("x", 5, 6, 10), Err(Error::Invalid(_))));
        assert!(matches!(check_range("x", 0, 0, 10), Err(Error::Invalid(_))));
        assert!(matches!(
            check_range("x", usize::MAX, 2, 10),
            Err(Error::Invalid(_))
        ));
    }

    const MAPS: &str = "\
55d0c0000000-55d0c0021000 r--p 00000000 fe:01 1234                       /usr/bin/probe
7f0000000000-7f0000200000 rw-s 00000000 00:01 99                         /memfd:hetmem (deleted)
7f0000200000-7f0000400000 rw-s 00200000 00:01 99                         /memfd:hetmem (deleted)
7f0000400000-7f0000600000 ---p 00000000 00:00 0 
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn maps_parsing() {
        let e = parse_maps(MAPS);
        assert_eq!(e.len(), 5);
        assert_eq!(e[1].start, 0x7f00_0000_0000);
        assert_eq!(e[1].end, 0x7f00_0020_0000);
        assert_eq!(e[1].perms, "rw-s");
        assert_eq!(e[1].inode, 99);
        assert_eq!(e[1].name, "/memfd:hetmem (deleted)");
        assert_eq!(e[3].name, "");
        assert_eq!(maps_overlapping(&e, 0x7f00_001f_f000, 0x2000).len(), 2);
    }

    #[test]
    fn shared_file_coverage() {
        let e = parse_maps(MAPS);
        let base = 0x7f00_0000_0000;
        assert!(maps_show_shared_file(&e, base, 4 << 20, 99, 0));
        assert!(maps_show_shared_file(&e, base + 0x1000, 0x1000, 99, 0x1000));
        assert!(maps_show_shared_file(
            &e,
            base + (2 << 20),
            2 << 20,
            99,
            2 << 20
        ));
        // Wrong inode, wrong offset, a PROT_NONE placeholder, or a range past the end.
        assert!(!maps_show_shared_file(&e, base, 4 << 20, 98, 0));
        assert!(!maps_show_shared_file(&e, base, 4 << 20, 99, 0x1000));
        assert!(!maps_show_shared_file(&e, base, 6 << 20, 99, 0));
        assert!(!maps_show_shared_file(&e, base - 0x1000, 0x2000, 99, 0));
    }
}
