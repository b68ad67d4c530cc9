//! The device driven as a guest driver would, one request chain at a time, and refusing
//! what a hostile one sends.
use proptest::prelude::*;
use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};

use super::*;
use crate::virtio::queue::Descriptor;

/// Guest RAM: 1 MiB at 0 (requests at 0x1000, responses at 0x2000, backing from
/// 0x10000), nothing above.
const RAM: u64 = 1 << 20;
const REQ: u64 = 0x1000;
const RESP: u64 = 0x2000;
const BACKING: u64 = 0x10000;

struct Rig {
    gpu: Gpu,
    displays: GpuDisplays,
    mem: OwnedMemory,
}

fn rig(modes: &[(u32, u32)]) -> Rig {
    rig_limits(modes, Limits::default())
}

fn rig_limits(modes: &[(u32, u32)], limits: Limits) -> Rig {
    let (gpu, displays) = Gpu::new(modes, limits).unwrap();
    let mem = OwnedMemory::zeroed(&MemoryLayout::new(&[(0, RAM)]).unwrap()).unwrap();
    Rig { gpu, displays, mem }
}

fn words(kind: u32, fields: &[u32]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(&[0; HDR_LEN - 4]);
    for f in fields {
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

impl Rig {
    /// Sends `req` on `queue` with a response buffer of `room` bytes; the response.
    fn send_on(&mut self, queue: usize, req: &[u8], room: u32) -> (Completion, Vec<u8>) {
        self.mem.write(REQ, req).unwrap();
        let chain = Chain {
            head: 0,
            descriptors: vec![
                Descriptor {
                    addr: REQ,
                    len: req.len() as u32,
                    writable: false,
                },
                Descriptor {
                    addr: RESP,
                    len: room,
                    writable: true,
                },
            ],
        };
        let c = self.gpu.process(queue, &chain, &self.mem);
        let mut out = vec![0; room as usize];
        self.mem.read(RESP, &mut out).unwrap();
        (c, out)
    }

    /// The response type of command `req`.
    fn send(&mut self, req: &[u8]) -> u32 {
        let (c, out) = self.send_on(CONTROL_QUEUE, req, 64);
        assert_eq!(c, Completion::Done(HDR_LEN as u32), "{:#x}", out[0]);
        u32::from_le_bytes(out[..4].try_into().unwrap())
    }

    fn create(&mut self, id: u32, format: Format, w: u32, h: u32) -> u32 {
        self.send(&words(CMD_RESOURCE_CREATE_2D, &[id, format as u32, w, h]))
    }

    fn attach(&mut self, id: u32, entries: &[(u64, u32)]) -> u32 {
        let mut req = words(CMD_RESOURCE_ATTACH_BACKING, &[id, entries.len() as u32]);
        for &(a, l) in entries {
            req.extend_from_slice(&a.to_le_bytes());
            req.extend_from_slice(&l.to_le_bytes());
            req.extend_from_slice(&0u32.to_le_bytes());
        }
        self.send(&req)
    }

    fn transfer(&mut self, id: u32, r: [u32; 4], offset: u64) -> u32 {
        let mut req = words(CMD_TRANSFER_TO_HOST_2D, &r);
        req.extend_from_slice(&offset.to_le_bytes());
        req.extend_from_slice(&id.to_le_bytes());
        req.extend_from_slice(&0u32.to_le_bytes());
        self.send(&req)
    }

    fn set_scanout(&mut self, scanout: u32, id: u32, r: [u32; 4]) -> u32 {
        let mut f = r.to_vec();
        f.extend([scanout, id]);
        self.send(&words(CMD_SET_SCANOUT, &f))
    }

    fn flush(&mut self, id: u32, r: [u32; 4]) -> u32 {
        let mut f = r.to_vec();
        f.extend([id, 0]);
        self.send(&words(CMD_RESOURCE_FLUSH, &f))
    }

    fn frame(&self, index: usize) -> Vec<u8> {
        let (w, h) = self.displays.modes()[index];
        let mut out = vec![0; w as usize * h as usize * 4];
        assert!(self.displays.read(index, &mut out));
        out
    }

    /// A 16x8 B8G8R8X8 resource 1 with its backing at BACKING, shown on scanout 0.
    fn shown(&mut self) {
        assert_eq!(self.create(1, Format::B8G8R8X8, 16, 8), RESP_OK_NODATA);
        assert_eq!(self.attach(1, &[(BACKING, 16 * 8 * 4)]), RESP_OK_NODATA);
        assert_eq!(self.set_scanout(0, 1, [0, 0, 16, 8]), RESP_OK_NODATA);
    }
}

fn pixel(x: u32, y: u32) -> u32 {
    0x0010_0000 * (x + 1) + 0x100 * y + 7
}

fn paint(mem: &OwnedMemory, w: u32, h: u32) {
    for y in 0..h {
        for x in 0..w {
            let at = BACKING + u64::from((y * w + x) * 4);
            mem.write(at, &pixel(x, y).to_le_bytes()).unwrap();
        }
    }
}

fn frame_pixel(frame: &[u8], w: u32, x: u32, y: u32) -> u32 {
    let at = ((y * w + x) * 4) as usize;
    u32::from_le_bytes(frame[at..at + 4].try_into().unwrap())
}

#[test]
fn display_info_and_edid_report_the_modes() {
    let mut r = rig(&[(640, 480), (800, 600)]);
    let (c, out) = r.send_on(CONTROL_QUEUE, &words(CMD_GET_DISPLAY_INFO, &[]), 512);
    assert_eq!(c, Completion::Done((HDR_LEN + 16 * 24) as u32));
    let word = |i: usize| u32::from_le_bytes(out[i..i + 4].try_into().unwrap());
    assert_eq!(word(0), RESP_OK_DISPLAY_INFO);
    // pmodes[1]: rect 0,0,800,600, enabled.
    assert_eq!([word(56), word(60), word(64), word(68)], [800, 600, 1, 0]);
    assert_eq!(word(HDR_LEN + 2 * 24 + 16), 0, "scanout 2 is disabled");

    let (c, out) = r.send_on(CONTROL_QUEUE, &words(CMD_GET_EDID, &[1, 0]), 2048);
    assert_eq!(c, Completion::Done((HDR_LEN + 8 + EDID_FIELD) as u32));
    assert_eq!(out[..4], RESP_OK_EDID.to_le_bytes());
    assert_eq!(out[HDR_LEN], 128);
    assert_eq!(&out[HDR_LEN + 8..HDR_LEN + 8 + 128], &edid(800, 600)[..]);
    let (_, out) = r.send_on(CONTROL_QUEUE, &words(CMD_GET_EDID, &[2, 0]), 64);
    assert_eq!(out[..4], RESP_ERR_INVALID_SCANOUT_ID.to_le_bytes());
}

#[test]
fn a_transfer_and_flush_reach_the_frame_in_xrgb() {
    let mut r = rig(&[(16, 8)]);
    r.shown();
    paint(&r.mem, 16, 8);
    // Only a 4x2 rectangle at (3,5) is transferred and flushed.
    let offset: u64 = (5 * 16 + 3) * 4;
    assert_eq!(r.transfer(1, [3, 5, 4, 2], offset), RESP_OK_NODATA);
    let before = r.displays.flushes(0);
    assert_eq!(r.flush(1, [3, 5, 4, 2]), RESP_OK_NODATA);
    assert_eq!(r.displays.flushes(0), before + 1);
    let f = r.frame(0);
    for y in 0..8 {
        for x in 0..16 {
            let inside = (3..7).contains(&x) && (5..7).contains(&y);
            let want = if inside { pixel(x, y) & 0x00ff_ffff } else { 0 };
            assert_eq!(frame_pixel(&f, 16, x, y), want, "({x},{y})");
        }
    }
}

#[test]
fn other_formats_are_converted_and_scatter_lists_followed() {
    let mut r = rig(&[(8, 2)]);
    assert_eq!(r.create(5, Format::R8G8B8X8, 8, 2), RESP_OK_NODATA);
    // Two pieces far apart: 7 pixels, then 9.
    let a = (BACKING + 0x8000, 28);
    assert_eq!(r.attach(5, &[(BACKING, 28), a]), RESP_OK_NODATA);
    let mut bytes = Vec::new();
    for i in 0..16u8 {
        bytes.extend_from_slice(&[i, 0x80, 0xff - i, 0xaa]);
    }
    r.mem.write(BACKING, &bytes[..28]).unwrap();
    r.mem.write(a.0, &bytes[28..56]).unwrap();
    assert_eq!(
        r.transfer(5, [0, 0, 8, 2], 0),
        RESP_ERR_INVALID_PARAMETER,
        "56 of 64 bytes"
    );
    r.mem.write(a.0, &bytes[28..64]).unwrap();
    assert_eq!(
        r.attach(5, &[(BACKING, 28)]),
        RESP_ERR_UNSPEC,
        "attached already"
    );
    r.send(&words(CMD_RESOURCE_DETACH_BACKING, &[5, 0]));
    assert_eq!(r.attach(5, &[(BACKING, 28), (a.0, 36)]), RESP_OK_NODATA);
    assert_eq!(r.transfer(5, [0, 0, 8, 2], 0), RESP_OK_NODATA);
    assert_eq!(r.set_scanout(0, 5, [0, 0, 8, 2]), RESP_OK_NODATA);
    let f = r.frame(0);
    for i in 0..16u32 {
        // R G B X in memory: R=i, G=0x80, B=0xff-i -> XRGB 0x00RRGGBB.
        let want = (i << 16) | 0x8000 | (0xff - i);
        assert_eq!(frame_pixel(&f, 8, i % 8, i / 8), want, "pixel {i}");
    }
}

#[test]
fn a_scatter_list_of_single_pixels_is_followed_line_by_line() {
    let mut r = rig(&[(4, 4)]);
    assert_eq!(r.create(1, Format::B8G8R8X8, 4, 4), RESP_OK_NODATA);
    // Pixel i lives at BACKING + 64 * (15 - i): each entry 4 bytes, in reverse order.
    let entries: Vec<(u64, u32)> = (0..16u64).map(|i| (BACKING + 64 * (15 - i), 4)).collect();
    assert_eq!(r.attach(1, &entries), RESP_OK_NODATA);
    for i in 0..16u32 {
        r.mem
            .write(
                BACKING + 64 * u64::from(15 - i),
                &(0x10101 * i).to_le_bytes(),
            )
            .unwrap();
    }
    // The lower right 2x2 only: offset of (2, 2).
    assert_eq!(r.transfer(1, [2, 2, 2, 2], (2 * 4 + 2) * 4), RESP_OK_NODATA);
    assert_eq!(r.set_scanout(0, 1, [0, 0, 4, 4]), RESP_OK_NODATA);
    let f = r.frame(0);
    for i in 0..16u32 {
        let (x, y) = (i % 4, i / 4);
        let want = if x >= 2 && y >= 2 { 0x10101 * i } else { 0 };
        assert_eq!(frame_pixel(&f, 4, x, y), want, "pixel {i}");
    }
}

#[test]
fn bad_resource_ids_are_refused() {
    let mut r = rig(&[(16, 8)]);
    assert_eq!(
        r.create(0, Format::B8G8R8X8, 4, 4),
        RESP_ERR_INVALID_RESOURCE_ID
    );
    r.shown();
    assert_eq!(
        r.create(1, Format::B8G8R8X8, 4, 4),
        RESP_ERR_INVALID_RESOURCE_ID
    );
    assert_eq!(r.transfer(9, [0, 0, 1, 1], 0), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(r.flush(9, [0, 0, 1, 1]), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(
        r.set_scanout(0, 9, [0, 0, 1, 1]),
        RESP_ERR_INVALID_RESOURCE_ID
    );
    assert_eq!(r.attach(9, &[(BACKING, 64)]), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(
        r.send(&words(CMD_RESOURCE_UNREF, &[9, 0])),
        RESP_ERR_INVALID_RESOURCE_ID
    );
    assert_eq!(r.send(&words(CMD_RESOURCE_UNREF, &[1, 0])), RESP_OK_NODATA);
    assert_eq!(
        r.flush(1, [0, 0, 1, 1]),
        RESP_ERR_INVALID_RESOURCE_ID,
        "gone"
    );
    assert_eq!(r.set_scanout(4, 0, [0; 4]), RESP_ERR_INVALID_SCANOUT_ID);
    assert_eq!(
        r.send(&words(0x0200, &[])),
        RESP_ERR_UNSPEC,
        "3D is not offered"
    );
}

#[test]
fn sizes_that_overflow_or_pass_the_caps_are_refused() {
    let limits = Limits {
        host_bytes: 64 * 64 * 4,
        resources: 2,
        backing_entries: 4,
    };
    let mut r = rig_limits(&[(16, 8)], limits);
    assert_eq!(
        r.create(1, Format::B8G8R8X8, u32::MAX, u32::MAX),
        RESP_ERR_OUT_OF_MEMORY
    );
    assert_eq!(
        r.create(1, Format::B8G8R8X8, 0, 8),
        RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        r.send(&words(CMD_RESOURCE_CREATE_2D, &[1, 999, 8, 8])),
        RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(r.create(1, Format::B8G8R8X8, 64, 64), RESP_OK_NODATA);
    assert_eq!(
        r.create(2, Format::B8G8R8X8, 1, 1),
        RESP_ERR_OUT_OF_MEMORY,
        "cap"
    );
    assert_eq!(r.send(&words(CMD_RESOURCE_UNREF, &[1, 0])), RESP_OK_NODATA);
    assert_eq!(r.create(2, Format::B8G8R8X8, 1, 1), RESP_OK_NODATA);
    assert_eq!(r.create(3, Format::B8G8R8X8, 1, 1), RESP_OK_NODATA);
    assert_eq!(
        r.create(4, Format::B8G8R8X8, 1, 1),
        RESP_ERR_OUT_OF_MEMORY,
        "count"
    );
    let five = [(BACKING, 4); 5];
    assert_eq!(
        r.attach(2, &five),
        RESP_ERR_INVALID_PARAMETER,
        "too many entries"
    );
    // The count promises more entries than the request holds.
    assert_eq!(
        r.send(&words(CMD_RESOURCE_ATTACH_BACKING, &[2, 3])),
        RESP_ERR_INVALID_PARAMETER
    );
}

#[test]
fn rectangles_outside_the_resource_are_refused_and_nothing_moves() {
    let mut r = rig(&[(16, 8)]);
    r.shown();
    paint(&r.mem, 16, 8);
    for rect in [
        [15, 0, 2, 1],
        [0, 7, 1, 2],
        [u32::MAX, 0, 2, 1],
        [0, 0, 17, 8],
    ] {
        assert_eq!(
            r.transfer(1, rect, 0),
            RESP_ERR_INVALID_PARAMETER,
            "{rect:?}"
        );
        assert_eq!(r.flush(1, rect), RESP_ERR_INVALID_PARAMETER, "{rect:?}");
        assert_eq!(
            r.set_scanout(0, 1, rect),
            RESP_ERR_INVALID_PARAMETER,
            "{rect:?}"
        );
    }
    // An offset that reads past the backing (512 bytes).
    assert_eq!(r.transfer(1, [0, 0, 16, 8], 4), RESP_ERR_INVALID_PARAMETER);
    assert_eq!(
        r.transfer(1, [0, 0, 1, 1], u64::MAX),
        RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(r.flush(1, [0, 0, 16, 8]), RESP_OK_NODATA);
    assert!(
        r.frame(0).iter().all(|&b| b == 0),
        "nothing was transferred"
    );
}

#[test]
fn backing_outside_guest_ram_is_refused() {
    let mut r = rig(&[(16, 8)]);
    assert_eq!(r.create(1, Format::B8G8R8X8, 16, 8), RESP_OK_NODATA);
    assert_eq!(r.attach(1, &[(RAM - 4, 8)]), RESP_ERR_INVALID_PARAMETER);
    assert_eq!(
        r.attach(1, &[(u64::MAX - 2, 8)]),
        RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(r.attach(1, &[(BACKING, 0)]), RESP_ERR_INVALID_PARAMETER);
    assert_eq!(
        r.transfer(1, [0, 0, 1, 1], 0),
        RESP_ERR_UNSPEC,
        "no backing"
    );
}

#[test]
fn malformed_chains_fail_without_a_response() {
    let mut r = rig(&[(16, 8)]);
    let (c, _) = r.send_on(CONTROL_QUEUE, &[1, 2, 3], 64);
    assert!(matches!(c, Completion::Failed(e) if e.contains("less than a command header")));
    // No room for the response.
    let (c, _) = r.send_on(CONTROL_QUEUE, &words(CMD_GET_DISPLAY_INFO, &[]), 8);
    assert!(matches!(c, Completion::Failed(e) if e.contains("room for 8")));
    let (c, out) = r.send_on(CONTROL_QUEUE, &words(CMD_RESOURCE_CREATE_2D, &[1]), 64);
    assert_eq!(c, Completion::Done(HDR_LEN as u32));
    assert_eq!(out[..4], RESP_ERR_INVALID_PARAMETER.to_le_bytes());
}

#[test]
fn fences_are_echoed() {
    let mut r = rig(&[(16, 8)]);
    let mut req = words(CMD_GET_DISPLAY_INFO, &[]);
    req[4] = FLAG_FENCE as u8;
    req[8..16].copy_from_slice(&77u64.to_le_bytes());
    let (_, out) = r.send_on(CONTROL_QUEUE, &req, 512);
    assert_eq!(out[4], FLAG_FENCE as u8);
    assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 77);
}

#[test]
fn the_cursor_queue_moves_and_refuses() {
    let mut r = rig(&[(16, 8)]);
    r.shown();
    let cursor = |kind, f: [u32; 7]| words(kind, &f);
    let (c, out) = r.send_on(
        CURSOR_QUEUE,
        &cursor(CMD_UPDATE_CURSOR, [0, 5, 6, 0, 1, 2, 3]),
        64,
    );
    assert_eq!(c, Completion::Done(HDR_LEN as u32));
    assert_eq!(out[..4], RESP_OK_NODATA.to_le_bytes());
    let (_, out) = r.send_on(
        CURSOR_QUEUE,
        &cursor(CMD_MOVE_CURSOR, [0, 9, 4, 0, 0, 0, 0]),
        64,
    );
    assert_eq!(out[..4], RESP_OK_NODATA.to_le_bytes());
    let c = r.displays.cursor();
    assert_eq!((c.x, c.y, c.resource, c.hot_x, c.hot_y), (9, 4, 1, 2, 3));
    let (_, out) = r.send_on(
        CURSOR_QUEUE,
        &cursor(CMD_UPDATE_CURSOR, [0, 0, 0, 0, 7, 0, 0]),
        64,
    );
    assert_eq!(out[..4], RESP_ERR_INVALID_RESOURCE_ID.to_le_bytes());
    let (_, out) = r.send_on(
        CURSOR_QUEUE,
        &cursor(CMD_UPDATE_CURSOR, [0, 0, 0, 0, 1, 16, 0]),
        64,
    );
    assert_eq!(
        out[..4],
        RESP_ERR_INVALID_PARAMETER.to_le_bytes(),
        "hot spot outside"
    );
    let (_, out) = r.send_on(
        CURSOR_QUEUE,
        &cursor(CMD_MOVE_CURSOR, [3, 0, 0, 0, 0, 0, 0]),
        64,
    );
    assert_eq!(out[..4], RESP_ERR_INVALID_SCANOUT_ID.to_le_bytes());
    assert_eq!(r.displays.cursor().x, 9, "kept");
}

#[test]
fn a_resize_raises_the_display_event_until_cleared() {
    let mut r = rig(&[(16, 8), (16, 8)]);
    let mut cfg = [0u8; 16];
    r.gpu.read_config(0, &mut cfg);
    assert_eq!(cfg[..4], [0; 4]);
    assert_eq!(cfg[8], 2, "num_scanouts");
    r.displays.resize(1, 32, 16).unwrap();
    assert!(r.displays.resize(2, 32, 16).is_err());
    let e = r.displays.resize(0, 0, 16).unwrap_err();
    assert!(e.contains("each edge is 1 to 16384"), "{e}");
    assert!(Gpu::new(&[(16, 99999)], Limits::default()).is_err());
    r.gpu.read_config(0, &mut cfg);
    assert_eq!(
        u32::from_le_bytes(cfg[..4].try_into().unwrap()),
        EVENT_DISPLAY
    );
    assert_eq!(r.displays.modes(), vec![(16, 8), (32, 16)]);
    assert_eq!(r.frame(1).len(), 32 * 16 * 4);
    r.gpu.write_config(4, &EVENT_DISPLAY.to_le_bytes());
    r.gpu.read_config(0, &mut cfg);
    assert_eq!(cfg[..4], [0; 4]);
}

#[test]
fn state_survives_a_save_and_restore_and_is_checked() {
    let mut r = rig(&[(16, 8)]);
    r.shown();
    paint(&r.mem, 16, 8);
    assert_eq!(r.transfer(1, [0, 0, 16, 8], 0), RESP_OK_NODATA);
    assert_eq!(r.flush(1, [0, 0, 16, 8]), RESP_OK_NODATA);
    let frame = r.frame(0);
    let saved = r.gpu.save_device();

    let mut back = rig(&[(16, 8)]);
    back.mem
        .write(BACKING, &{
            let mut b = vec![0; 512];
            r.mem.read(BACKING, &mut b).unwrap();
            b
        })
        .unwrap();
    back.gpu.restore_device(&saved, &back.mem).unwrap();
    assert_eq!(back.frame(0), frame);
    assert_eq!(
        back.flush(1, [0, 0, 16, 8]),
        RESP_OK_NODATA,
        "resource 1 is back"
    );

    // Untrusted: a backing outside guest RAM, a scanout naming no resource, a count
    // of scanouts that is not this GPU's.
    let mut bad = saved.clone();
    bad["resources"][0]["backing"][0][0] = serde_json::json!(RAM);
    let e = back.gpu.restore_device(&bad, &back.mem).unwrap_err();
    assert!(e.contains("not inside guest RAM"), "{e}");
    let mut bad = saved.clone();
    bad["scanouts"][0]["resource"] = serde_json::json!(9);
    let e = back.gpu.restore_device(&bad, &back.mem).unwrap_err();
    assert!(e.contains("resource 9 does not exist"), "{e}");
    let e = rig(&[(16, 8), (16, 8)])
        .gpu
        .check_device(&saved)
        .unwrap_err();
    assert!(e.contains("1 scanouts; this GPU has 2"), "{e}");
}

#[test]
fn a_reset_forgets_the_resources() {
    let mut r = rig(&[(16, 8)]);
    r.shown();
    r.gpu.reset();
    assert_eq!(r.flush(1, [0, 0, 1, 1]), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(r.create(1, Format::B8G8R8X8, 16, 8), RESP_OK_NODATA);
}

/// The commands a hostile driver's records are made of (and one outside the set).
const KINDS: [u32; 12] = [
    CMD_GET_DISPLAY_INFO,
    CMD_RESOURCE_CREATE_2D,
    CMD_RESOURCE_UNREF,
    CMD_SET_SCANOUT,
    CMD_RESOURCE_FLUSH,
    CMD_TRANSFER_TO_HOST_2D,
    CMD_RESOURCE_ATTACH_BACKING,
    CMD_RESOURCE_DETACH_BACKING,
    CMD_GET_EDID,
    CMD_UPDATE_CURSOR,
    CMD_MOVE_CURSOR,
    0x0200,
];

/// Small field values, with the edges that break arithmetic now and then.
fn field() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 0u32..40,
        2 => Just(0x10000u32),
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

/// A record of the hostile driver's input: a command with plausible fields.
fn record() -> impl Strategy<Value = Vec<u8>> {
    (
        0u8..8,
        0..KINDS.len(),
        prop::collection::vec(field(), 0..12),
    )
        .prop_map(|(op, k, f)| {
            let body = words(KINDS[k], &f);
            let mut r = vec![op];
            r.extend_from_slice(&(body.len() as u16).to_le_bytes());
            r.extend_from_slice(&body);
            r
        })
}

#[test]
fn the_fuzz_seeds_replay() {
    // Display info, EDID, create, attach, set scanout, transfer, flush, a cursor update
    // (a cursor move with no room for its answer fails), and after a save/restore round
    // trip, flush again.
    let seed = include_bytes!("../../../../../fuzz/seeds/virtio_gpu/scanout");
    assert_eq!(super::hostile::replay(seed), 9);
    let seed = include_bytes!("../../../../../fuzz/seeds/virtio_gpu/refusals");
    // Only the resource whose later uses are refused is created.
    assert_eq!(super::hostile::replay(seed), 1);
}

proptest! {
    #[test]
    fn a_hostile_driver_breaks_no_invariant(
        backing in prop::collection::vec(any::<u8>(), 4096),
        records in prop::collection::vec(record(), 0..40),
    ) {
        let mut input = (backing.len() as u16).to_le_bytes().to_vec();
        input.extend(backing);
        input.extend(records.concat());
        super::hostile::replay(&input);
    }


    #[test]
    fn random_bytes_break_no_invariant(data in prop::collection::vec(any::<u8>(), 0..6000)) {
        super::hostile::replay(&data);
    }
}

/// A back end serving connections on a Unix socket until `stop` (each connection's
/// stream kept, so that stopping closes them as a dying process would).
struct Backend {
    path: std::path::PathBuf,
    streams: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl Backend {
    fn start(path: &std::path::Path) -> Backend {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        let streams: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>> = Arc::default();
        let kept = streams.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                kept.lock().unwrap().push(s.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = backend::serve_conn(&mut s, None, Limits::default());
                });
            }
        });
        Backend {
            path: path.to_path_buf(),
            streams,
        }
    }

    /// Closes every connection and the socket: the back end is gone.
    fn kill(self) {
        let _ = std::fs::remove_file(&self.path);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn remote_rig(modes: &[(u32, u32)], path: &std::path::Path) -> Rig {
    let (gpu, displays) = Gpu::new_remote(
        modes,
        Limits::default(),
        remote::Endpoint::Unix(path.to_path_buf()),
        remote::ANSWER_TIMEOUT,
    )
    .unwrap();
    let mem = OwnedMemory::zeroed(&MemoryLayout::new(&[(0, RAM)]).unwrap()).unwrap();
    Rig { gpu, displays, mem }
}

impl Rig {
    /// One reconnection attempt, as the watcher makes.
    fn reconnect(&self) -> bool {
        let mut core = self.gpu.shared.core();
        let mut link = self.gpu.shared.link().unwrap();
        link.connect(&mut core, &self.mem).is_ok()
    }
}

#[test]
fn a_remote_gpu_shows_what_a_local_one_does_and_survives_its_back_end() {
    let dir = std::env::temp_dir().join(format!("ray-gpu-remote-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gpu.sock");
    let backend = Backend::start(&path);
    let mut remote = remote_rig(&[(16, 8)], &path);
    let mut local = rig(&[(16, 8)]);
    assert!(remote.reconnect());
    assert_eq!(remote.displays.remote().unwrap().error, None);
    for r in [&mut remote, &mut local] {
        r.shown();
        paint(&r.mem, 16, 8);
        let offset: u64 = (5 * 16 + 3) * 4;
        assert_eq!(r.transfer(1, [3, 5, 4, 2], offset), RESP_OK_NODATA);
        assert_eq!(r.flush(1, [3, 5, 4, 2]), RESP_OK_NODATA);
        // Refused alike: the ledger checks as the local GPU does.
        assert_eq!(r.flush(9, [0, 0, 1, 1]), RESP_ERR_INVALID_RESOURCE_ID);
        assert_eq!(r.transfer(1, [0, 0, 17, 1], 0), RESP_ERR_INVALID_PARAMETER);
        assert_eq!(
            r.create(1, Format::B8G8R8X8, 4, 4),
            RESP_ERR_INVALID_RESOURCE_ID
        );
    }
    assert_eq!(remote.frame(0), local.frame(0));
    let shown = remote.frame(0);

    backend.kill();
    // The next command finds the back end gone: an error response, Error with the reason.
    assert_eq!(remote.flush(1, [0, 0, 16, 8]), RESP_ERR_UNSPEC);
    let status = remote.displays.remote().unwrap();
    assert!(status.error.is_some(), "{status:?}");
    assert_eq!(
        remote.create(2, Format::B8G8R8X8, 4, 4),
        RESP_ERR_UNSPEC,
        "refused in Error"
    );
    assert_eq!(remote.frame(0), shown, "the display keeps its last picture");
    assert!(!remote.reconnect(), "nobody listens");

    // Back: the ledger is replayed, the whole resource transferred from the backing.
    let again = Backend::start(&path);
    assert!(remote.reconnect());
    assert_eq!(remote.displays.remote().unwrap().error, None);
    assert_eq!(remote.displays.remote().unwrap().connections, 2);
    local.transfer(1, [0, 0, 16, 8], 0);
    local.flush(1, [0, 0, 16, 8]);
    assert_eq!(remote.frame(0), local.frame(0));
    assert_eq!(remote.create(2, Format::B8G8R8X8, 4, 4), RESP_OK_NODATA);
    again.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_back_end_sending_garbage_loses_its_connection_only() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("ray-gpu-garbage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gpu.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut hello = vec![0; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut hello).unwrap();
        // A damage frame that claims far more pixels than it has.
        s.write_all(&[9, 0, 0, 0, 65, 0, 0, 0, 0, 1, 2, 3, 4])
            .unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let remote = remote_rig(&[(16, 8)], &path);
    assert!(!remote.reconnect());
    let why = remote.displays.remote().unwrap().error.unwrap();
    assert!(
        why.contains("answered the Hello") || why.contains("broke the protocol"),
        "{why}"
    );
    fake.join().unwrap();
    let _ = std::fs::remove_file(&path);
    let backend = Backend::start(&path);
    assert!(remote.reconnect());
    backend.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_remote_fuzz_seed_is_a_session_a_back_end_serves() {
    // Hello, create, transfer, set scanout, flush, cursor, ping, and an unref of a
    // resource that does not exist.
    let seed = include_bytes!("../../../../../fuzz/seeds/gpu_remote_wire/session");
    let mut peer = std::io::Cursor::new(seed.to_vec());
    let mut out = Vec::new();
    struct Both<'a>(&'a mut std::io::Cursor<Vec<u8>>, &'a mut Vec<u8>);
    impl std::io::Read for Both<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl std::io::Write for Both<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    backend::serve_conn(
        &mut Both(&mut peer, &mut out),
        Some(b"fuzz-token-0123456789"),
        Limits::default(),
    )
    .unwrap();
    let mut answers = Vec::new();
    let mut damage = 0;
    let mut at = &out[..];
    while !at.is_empty() {
        match wire::recv(&mut at).unwrap() {
            wire::Message::Welcome { version } => assert_eq!(version, wire::VERSION),
            wire::Message::Damage { .. } => damage += 1,
            wire::Message::Answer { code, .. } => answers.push(code),
            other => panic!("{other:?}"),
        }
    }
    let mut want = vec![RESP_OK_NODATA; 6];
    want.push(RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(answers, want);
    assert_eq!(damage, 2, "the scanout set, then the flushed corner");
}

#[test]
fn watched_damage_is_announced_and_handed_over_with_its_pixels() {
    let mut r = rig(&[(16, 8), (4, 4)]);
    let (tx, rx) = std::sync::mpsc::channel();
    r.displays.watch_damage(tx);
    r.shown();
    assert!(
        rx.try_recv().is_ok(),
        "showing a resource changes the frame"
    );
    let d = r.displays.take_damage(false);
    assert_eq!(d.len(), 1, "only scanout 0 changed: {d:?}");
    assert_eq!((d[0].scanout, d[0].mode, d[0].shown), (0, (16, 8), true));
    assert_eq!(
        d[0].rect,
        Rect {
            x: 0,
            y: 0,
            width: 16,
            height: 8
        }
    );
    assert!(r.displays.take_damage(false).is_empty(), "handed over once");

    // Two flushed areas come back as their bounding rectangle, with the frame's pixels.
    paint(&r.mem, 16, 8);
    assert_eq!(r.transfer(1, [0, 0, 16, 8], 0), RESP_OK_NODATA);
    assert!(rx.try_recv().is_err(), "a transfer alone changes no frame");
    assert_eq!(r.flush(1, [2, 1, 2, 1]), RESP_OK_NODATA);
    assert_eq!(r.flush(1, [5, 3, 1, 2]), RESP_OK_NODATA);
    let d = r.displays.take_damage(false);
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].rect,
        Rect {
            x: 2,
            y: 1,
            width: 4,
            height: 4
        }
    );
    for (i, px) in d[0].pixels.chunks_exact(4).enumerate() {
        let (x, y) = (2 + i as u32 % 4, 1 + i as u32 / 4);
        let inside = (x, y) == (2, 1) || (x, y) == (3, 1) || (x == 5 && (3..5).contains(&y));
        let want = if inside { pixel(x, y) & 0x00ff_ffff } else { 0 };
        assert_eq!(
            u32::from_le_bytes(px.try_into().unwrap()),
            want,
            "({x},{y})"
        );
    }

    // Everything, on request: both scanouts whole; scanout 1 shows nothing.
    let all = r.displays.take_damage(true);
    assert_eq!(all.len(), 2);
    assert_eq!(
        all[1].rect,
        Rect {
            x: 0,
            y: 0,
            width: 4,
            height: 4
        }
    );
    assert!(!all[1].shown);
    assert_eq!(all[0].pixels, r.frame(0));

    // Disabling the scanout is a change too; a refused command is counted, not announced.
    while rx.try_recv().is_ok() {}
    assert_eq!(r.set_scanout(0, 0, [0, 0, 0, 0]), RESP_OK_NODATA);
    assert!(rx.try_recv().is_ok());
    assert!(!r.displays.take_damage(false)[0].shown);
    assert_eq!(r.displays.refused(), 0);
    assert_eq!(r.flush(9, [0, 0, 1, 1]), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(r.displays.refused(), 1);
    assert!(rx.try_recv().is_err());
}
