//! End-to-end basics: first touch, device read/write, migration both ways, CPU read-back.

use hetmem::{DeviceKind, Hetmem, Target, PAGE_SIZE};

fn roundtrip(kind: DeviceKind) -> anyhow::Result<()> {
    let hm = Hetmem::builder().sim_device(kind, 8 << 20).build()?;
    let dev = hm.device(0).unwrap();
    let len = 4 << 20;
    let mut buf = hm.alloc(len)?;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let data = dev.read(buf.addr(), len)?;
    assert!(data.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    dev.write(buf.addr(), &vec![7u8; 2 * PAGE_SIZE])?;
    assert_eq!(&buf[..2 * PAGE_SIZE], &vec![7u8; 2 * PAGE_SIZE][..]);
    hm.migrate(buf.addr(), len, Target::Device(dev.id()))?;
    assert!(buf[2 * PAGE_SIZE..]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((i + 2 * PAGE_SIZE) % 251) as u8));
    hm.migrate(buf.addr(), len, Target::Device(dev.id()))?;
    dev.write(buf.addr() + PAGE_SIZE * 10, &[9u8; PAGE_SIZE])?;
    assert_eq!(buf[PAGE_SIZE * 10], 9);
    assert_eq!(hm.stats().errors, 0);
    Ok(())
}

#[test]
fn private_roundtrip() -> anyhow::Result<()> {
    roundtrip(DeviceKind::Private)
}

#[test]
fn coherent_roundtrip() -> anyhow::Result<()> {
    roundtrip(DeviceKind::Coherent)
}
