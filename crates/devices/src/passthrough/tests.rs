//! The whole passthrough path against the GPU device served over vfio-user from another
//! thread: configuration space, BARs, MSI-X to an eventfd, DMA in both directions over a
//! shared memfd, and the device going away.
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::gpu_server::*;
use super::vfio_user::UserDevice;
use super::*;
use crate::interrupt::{MsiInterrupts, MsiMessage};
use crate::pci::PciDevice;

/// Routes and holds as the function asked for them; the eventfds the device signals.
#[derive(Default)]
struct Routes(
    Mutex<Vec<(u16, Option<MsiMessage>)>>,
    Mutex<Vec<(u16, bool)>>,
    Mutex<Vec<EventFd>>,
);
impl Routes {
    fn held(&self, v: u16) -> Option<bool> {
        self.1
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|h| h.0 == v)
            .map(|h| h.1)
    }
}
impl DirectVectors for Routes {
    fn hold(&self, v: u16, held: bool) -> Result<(), String> {
        self.1.lock().unwrap().push((v, held));
        Ok(())
    }
    fn waiting(&self, v: u16) -> bool {
        let events = self.2.lock().unwrap();
        match events[usize::from(v)].read() {
            Ok(n) => {
                events[usize::from(v)].write(n).unwrap();
                true
            }
            Err(_) => false,
        }
    }
}
impl MsiInterrupts for Routes {
    fn route(&self, v: u16, m: Option<MsiMessage>) -> Result<(), String> {
        self.0.lock().unwrap().push((v, m));
        Ok(())
    }
    fn trigger(&self, _: u16) {}
}

struct Place {
    next: u64,
    events: Vec<EventFd>,
    routes: Arc<Routes>,
}
impl Placement for Place {
    fn bar(&mut self, size: u64) -> Result<u64, String> {
        let at = self.next.next_multiple_of(size);
        self.next = at + size;
        Ok(at)
    }
    fn vectors(&mut self, count: u16) -> Result<(Arc<dyn DirectVectors>, Vec<RawFd>), String> {
        self.events = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        *self.routes.2.lock().unwrap() =
            self.events.iter().map(|e| e.try_clone().unwrap()).collect();
        let fds = self.events.iter().map(|e| e.as_raw_fd()).collect();
        Ok((self.routes.clone(), fds))
    }
}

/// Guest RAM stand-in: a memfd mapped here, as the VMM maps the guest's.
struct Ram {
    fd: std::fs::File,
    ptr: *mut u8,
    size: usize,
}
impl Ram {
    fn new(size: usize) -> Self {
        // SAFETY: plain syscalls on a fresh memfd; results are checked.
        unsafe {
            let fd = libc::memfd_create(c"test-ram".as_ptr(), 0);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, size as libc::off_t), 0);
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            Self {
                fd: std::os::fd::FromRawFd::from_raw_fd(fd),
                ptr: ptr.cast(),
                size,
            }
        }
    }
    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.size);
        // SAFETY: inside our mapping; the device may write it concurrently, hence a raw copy.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) }
    }
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.size);
        let mut v = vec![0; len];
        // SAFETY: as for `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), len) }
        v
    }
}

fn socket(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ray-pt-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn reg(d: &mut PassthroughPci, off: u64) -> u32 {
    let mut b = [0; 4];
    d.read_bar(REGS_BAR as usize, off, &mut b);
    u32::from_le_bytes(b)
}

fn set(d: &mut PassthroughPci, off: u64, v: u32) {
    d.write_bar(REGS_BAR as usize, off, &v.to_le_bytes());
}

const IOVA: u64 = 0x10_0000;

#[test]
fn a_vfio_user_gpu_works_through_the_passthrough_function() {
    let path = socket("gpu");
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.clone();
    std::thread::spawn(move || serve(&p, move || tx.send(()).unwrap()));
    rx.recv().unwrap();

    let ram = Ram::new(1 << 20);
    let dma = DmaRegion {
        iova: IOVA,
        size: ram.size as u64,
        fd: ram.fd.as_raw_fd(),
        fd_offset: 0,
        host: ram.ptr as usize,
    };
    let health = Arc::new(Health::default());
    let mut place = Place {
        next: 0xc000_0000,
        events: Vec::new(),
        routes: Arc::new(Routes::default()),
    };
    let access = Box::new(UserDevice::connect(&path, link::DEFAULT_TIMEOUT).unwrap());
    let mut d = PassthroughPci::new(access, health.clone(), &mut place, &[dma]).unwrap();

    // Configuration space: the device's identity, our BARs, our MSI-X capability.
    let c = d.config();
    assert_eq!((c.u16_at(0), c.u16_at(2)), (VENDOR, DEVICE));
    assert_eq!(c.u32_at(8) >> 8, 0x038000);
    assert_eq!(c.bar_size(0), VRAM_SIZE);
    assert_eq!(c.bar_size(2), REGS_SIZE);
    assert_eq!(c.bar_address(0), Some(0xc000_0000));
    assert_eq!(c.bar_size(1), 0);
    let cap = usize::from(c.u16_at(0x34) as u8);
    assert_eq!(c.u16_at(cap) & 0xff, 0x11);
    assert_eq!(c.u16_at(cap + 2) & 0x7ff, MSIX_VECTORS as u16 - 1);
    assert_eq!(c.u32_at(cap + 4), MSIX_TABLE | REGS_BAR);
    // The BAR sizing protocol works on our copy.
    d.write_config(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(d.config().u32_at(0x10), !(VRAM_SIZE as u32 - 1));
    d.write_config(0x10, &0xc000_0000u32.to_le_bytes());

    // Memory decoding and bus mastering reach the device's command register.
    d.write_config(4, &6u16.to_le_bytes());
    assert_eq!(d.config().command(), 6);

    // Registers and VRAM through the BARs.
    assert_eq!(reg(&mut d, REG_ID), MAGIC);
    assert_eq!(reg(&mut d, REG_VRAM_SIZE), VRAM_SIZE as u32);
    set(&mut d, REG_WIDTH, 800);
    assert_eq!(reg(&mut d, REG_WIDTH), 800);
    d.write_bar(0, 0x1000, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let mut back = [0; 8];
    d.read_bar(0, 0x1000, &mut back);
    assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8]);

    // MSI-X: program vector 0, enable; the table is ours.
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x51,
    };
    let table = u64::from(MSIX_TABLE);
    set(&mut d, table, msg.address as u32);
    set(&mut d, table + 8, msg.data);
    set(&mut d, table + 12, 0);
    assert_eq!(reg(&mut d, table + 8), 0x51);
    d.write_config(cap + 2, &(0x8000u16 | 1).to_le_bytes());
    assert!(place.routes.0.lock().unwrap().contains(&(0, Some(msg))));

    // DMA guest -> VRAM, interrupt, VRAM read back through the BAR.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    ram.write(0x2000, &pattern);
    set(&mut d, REG_DMA_ADDR_LO, (IOVA + 0x2000) as u32);
    set(&mut d, REG_DMA_ADDR_HI, 0);
    set(&mut d, REG_DMA_LEN, 4096);
    set(&mut d, REG_VRAM_OFFSET, 0x8000);
    set(&mut d, REG_COMMAND, CMD_TO_VRAM);
    set(&mut d, REG_DOORBELL, 1);
    wait_for("the MSI-X eventfd", || place.events[0].read().is_ok());
    assert_eq!(reg(&mut d, REG_STATUS), STATUS_DONE);
    let mut vram = vec![0; 4096];
    for (i, chunk) in vram.chunks_mut(8).enumerate() {
        d.read_bar(0, 0x8000 + 8 * i as u64, chunk);
    }
    assert_eq!(vram, pattern);

    // And back: VRAM -> guest, elsewhere.
    set(&mut d, REG_DMA_ADDR_LO, (IOVA + 0x9000) as u32);
    set(&mut d, REG_COMMAND, CMD_FROM_VRAM);
    set(&mut d, REG_DOORBELL, 1);
    wait_for("the second interrupt", || place.events[0].read().is_ok());
    assert_eq!(ram.read(0x9000, 4096), pattern);
    assert_eq!(reg(&mut d, REG_COMPLETED), 2);

    // A guest address outside the mapping is refused by the device, not followed.
    set(&mut d, REG_DMA_ADDR_LO, 0x1000);
    set(&mut d, REG_DOORBELL, 1);
    wait_for("the third interrupt", || place.events[0].read().is_ok());
    assert_eq!(reg(&mut d, REG_STATUS), STATUS_ERR_GUEST_RANGE);
    set(&mut d, REG_DMA_ADDR_LO, (IOVA + 0x2000) as u32);
    set(&mut d, REG_VRAM_OFFSET, VRAM_SIZE as u32 - 16);
    set(&mut d, REG_DOORBELL, 1);
    wait_for("the fourth interrupt", || place.events[0].read().is_ok());
    assert_eq!(reg(&mut d, REG_STATUS), STATUS_ERR_VRAM_RANGE);

    // Masks: every vector started held back; vector 0 was let go when unmasked, vector 1
    // (masked) never was.
    assert_eq!(place.routes.1.lock().unwrap()[..2], [(0, true), (1, true)]);
    assert_eq!(place.routes.held(0), Some(false));
    assert_eq!(place.routes.held(1), Some(true));
    let pba = u64::from(MSIX_PBA);
    // Vector 0 masked: held back; a command's signal waits and shows in the PBA.
    set(&mut d, table + 12, 1);
    assert_eq!(place.routes.held(0), Some(true));
    assert_eq!(reg(&mut d, pba), 0);
    set(&mut d, REG_VRAM_OFFSET, 0);
    set(&mut d, REG_DOORBELL, 1);
    assert_eq!(reg(&mut d, REG_STATUS), STATUS_DONE);
    assert_eq!(reg(&mut d, pba), 1, "vector 0 pending while masked");
    // Unmasked: let go (the VMM's side sends what waited), the PBA no longer shows it.
    set(&mut d, table + 12, 0);
    assert_eq!(place.routes.held(0), Some(false));
    assert_eq!(reg(&mut d, pba), 0);
    assert!(
        place.events[0].read().is_ok(),
        "the signal that waited is there"
    );
    // The function mask holds every vector back, and lifting it lets go of the unmasked.
    d.write_config(cap + 2, &(0xc000u16 | 1).to_le_bytes());
    assert_eq!(place.routes.held(0), Some(true));
    set(&mut d, REG_DOORBELL, 1);
    assert_eq!(
        reg(&mut d, pba),
        1,
        "vector 0 pending under the function mask"
    );
    d.write_config(cap + 2, &(0x8000u16 | 1).to_le_bytes());
    assert_eq!(place.routes.held(0), Some(false));
    assert_eq!(place.routes.held(1), Some(true));
    assert_eq!(health.error(), None);
}

/// The device's server dies in the middle of an access (its thread ends and its end of
/// the socket closes): the function is cut off with the reason, and answers all-ones.
struct Dies(GpuDevice);
impl ::vfio_user::ServerBackend for Dies {
    fn region_read(&mut self, r: u32, o: u64, d: &mut [u8]) -> std::io::Result<()> {
        self.0.region_read(r, o, d)
    }
    fn region_write(&mut self, r: u32, o: u64, d: &[u8]) -> std::io::Result<()> {
        assert!(!(r == REGS_BAR && o == 0x3c), "the device dies here");
        self.0.region_write(r, o, d)
    }
    fn dma_map(
        &mut self,
        f: ::vfio_user::DmaMapFlags,
        o: u64,
        a: u64,
        s: u64,
        fd: Option<std::fs::File>,
    ) -> std::io::Result<()> {
        self.0.dma_map(f, o, a, s, fd)
    }
    fn dma_unmap(&mut self, f: ::vfio_user::DmaUnmapFlags, a: u64, s: u64) -> std::io::Result<()> {
        self.0.dma_unmap(f, a, s)
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.0.reset()
    }
    fn set_irqs(
        &mut self,
        i: u32,
        f: u32,
        s: u32,
        c: u32,
        fds: Vec<std::fs::File>,
    ) -> std::io::Result<()> {
        self.0.set_irqs(i, f, s, c, fds)
    }
}

#[test]
fn a_device_that_dies_is_cut_off_with_a_reason() {
    let path = socket("dies");
    let p = path.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let server = ::vfio_user::Server::new(&p, true, irqs(), regions()).unwrap();
        tx.send(()).unwrap();
        let _ = server.run(&mut Dies(GpuDevice::new()));
    });
    rx.recv().unwrap();
    let health = Arc::new(Health::default());
    let mut place = Place {
        next: 0xc000_0000,
        events: Vec::new(),
        routes: Arc::new(Routes::default()),
    };
    let access = Box::new(UserDevice::connect(&path, link::DEFAULT_TIMEOUT).unwrap());
    let mut d = PassthroughPci::new(access, health.clone(), &mut place, &[]).unwrap();
    assert_eq!(reg(&mut d, REG_ID), MAGIC);
    d.probe();
    assert_eq!(health.error(), None);
    set(&mut d, 0x3c, 1);
    assert!(server.join().is_err(), "the server thread died");
    // The write may or may not have seen the end; the next access does.
    assert_eq!(reg(&mut d, REG_ID), u32::MAX);
    let e = health.error().expect("the failure is kept");
    assert!(
        e.starts_with(&format!(
            "passthrough device vfio-user {} stopped answering: ",
            path.display()
        )),
        "{e}"
    );
    // Cut off: all-ones, writes dropped, no new error text.
    set(&mut d, REG_WIDTH, 5);
    assert_eq!(reg(&mut d, REG_WIDTH), u32::MAX);
    d.probe();
    assert_eq!(health.error().as_deref(), Some(e.as_str()));
    // Nobody listens any more: a new connection is refused, naming the socket.
    let e = UserDevice::connect(&path, link::DEFAULT_TIMEOUT)
        .err()
        .unwrap();
    assert!(e.0.contains("cannot reach the vfio-user device at"), "{e}");
}

/// The device's server hangs inside a read (as a stopped process would): the access is
/// given up after the bound, the function is cut off naming the device and the request,
/// and the late answer is never taken for the answer to a later request.
struct Hangs(GpuDevice, std::sync::mpsc::Receiver<()>);
impl ::vfio_user::ServerBackend for Hangs {
    fn region_read(&mut self, r: u32, o: u64, d: &mut [u8]) -> std::io::Result<()> {
        if r == REGS_BAR && o == REG_HEIGHT {
            // Until the test lets go.
            let _ = self.1.recv();
        }
        self.0.region_read(r, o, d)
    }
    fn region_write(&mut self, r: u32, o: u64, d: &[u8]) -> std::io::Result<()> {
        self.0.region_write(r, o, d)
    }
    fn dma_map(
        &mut self,
        f: ::vfio_user::DmaMapFlags,
        o: u64,
        a: u64,
        s: u64,
        fd: Option<std::fs::File>,
    ) -> std::io::Result<()> {
        self.0.dma_map(f, o, a, s, fd)
    }
    fn dma_unmap(&mut self, f: ::vfio_user::DmaUnmapFlags, a: u64, s: u64) -> std::io::Result<()> {
        self.0.dma_unmap(f, a, s)
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.0.reset()
    }
    fn set_irqs(
        &mut self,
        i: u32,
        f: u32,
        s: u32,
        c: u32,
        fds: Vec<std::fs::File>,
    ) -> std::io::Result<()> {
        self.0.set_irqs(i, f, s, c, fds)
    }
}

#[test]
fn a_device_that_hangs_is_given_up_after_the_bound_and_cut_off() {
    let path = socket("hangs");
    let p = path.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let server = ::vfio_user::Server::new(&p, true, irqs(), regions()).unwrap();
        tx.send(()).unwrap();
        server.run(&mut Hangs(GpuDevice::new(), held))
    });
    rx.recv().unwrap();
    let health = Arc::new(Health::default());
    let mut place = Place {
        next: 0xc000_0000,
        events: Vec::new(),
        routes: Arc::new(Routes::default()),
    };
    let bound = Duration::from_millis(300);
    let access = Box::new(UserDevice::connect(&path, bound).unwrap());
    let mut d = PassthroughPci::new(access, health.clone(), &mut place, &[]).unwrap();
    assert_eq!(reg(&mut d, REG_WIDTH), 640);
    let start = Instant::now();
    assert_eq!(
        reg(&mut d, REG_HEIGHT),
        u32::MAX,
        "a hung read reads all-ones"
    );
    assert!(start.elapsed() >= bound, "given up only after the bound");
    let e = health.error().expect("the failure is kept");
    assert_eq!(
        e,
        format!(
            "passthrough device vfio-user {p} stopped answering: the vfio-user device at {p} \
             did not answer a read of region 2 at 0xc within 300 ms (the link is closed)",
            p = path.display()
        )
    );
    // The device answers late: the link is closed, so nothing is taken from it; the
    // server sees the link end.
    release.send(()).unwrap();
    let _ = server
        .join()
        .expect("the server's link ends and its thread with it");
    assert_eq!(reg(&mut d, REG_WIDTH), u32::MAX);
    d.probe();
    assert_eq!(health.error().as_deref(), Some(e.as_str()));
}
