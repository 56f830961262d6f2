//! Byte-level tests of the framing: literal fixtures and validation rules.

use super::*;

/// A write request as the spec lays it out, byte by byte.
const WRITE_REQ: [u8; REQUEST_LEN] = [
    0x25, 0x60, 0x95, 0x13, // magic
    0x00, 0x01, // flags: FUA
    0x00, 0x01, // type: WRITE
    1, 2, 3, 4, 5, 6, 7, 8, // cookie
    0, 0, 0, 0, 0, 0, 0x10, 0x00, // offset 4096
    0, 0, 0x02, 0x00, // length 512
];

#[test]
fn request_round_trip() {
    let r = Request::parse(&WRITE_REQ).unwrap();
    assert_eq!(
        r,
        Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        }
    );
    assert_eq!(r.encode(), WRITE_REQ);
    assert_eq!(r.payload_len(), 512);
}

#[test]
fn bad_request_magic() {
    let mut b = WRITE_REQ;
    b[0] = 0;
    assert!(matches!(Request::parse(&b), Err(FrameError::BadMagic(_))));
}

fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        kind,
        cookie: 7,
        offset,
        len,
    }
}

const RW: Limits = Limits {
    size: 1 << 20,
    writable: true,
    structured: true,
    block_status: true,
};

fn errno(r: Request, lim: &Limits) -> Option<u32> {
    r.validate(lim).err().map(|e| e.errno.0)
}

#[test]
fn validation_follows_the_spec() {
    let ro = Limits {
        writable: false,
        ..RW
    };
    let simple = Limits {
        structured: false,
        block_status: false,
        ..RW
    };
    assert_eq!(errno(req(CMD_READ, 0, 0, 4096), &RW), None);
    assert_eq!(errno(req(CMD_READ, 0, (1 << 20) - 1, 2), &RW), Some(22));
    assert_eq!(errno(req(CMD_READ, 0, u64::MAX, 2), &RW), Some(22));
    assert_eq!(errno(req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &RW), Some(22));
    assert_eq!(errno(req(CMD_WRITE, 0, 1 << 20, 1), &RW), Some(28));
    assert_eq!(errno(req(CMD_WRITE, 0, 0, 1), &ro), Some(1));
    assert_eq!(errno(req(CMD_TRIM, 0, 1 << 20, 1), &RW), Some(22));
    assert_eq!(
        errno(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 9), &RW),
        None
    );
    assert_eq!(errno(req(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &RW), Some(28));
    assert_eq!(errno(req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &RW), Some(22));
    assert_eq!(errno(req(CMD_READ, CMD_FLAG_DF, 0, 1), &RW), None);
    assert_eq!(errno(req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple), Some(22));
    assert_eq!(errno(req(CMD_BLOCK_STATUS, 0, 0, 1), &simple), Some(22));
    assert_eq!(errno(req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &RW), None);
    assert_eq!(errno(req(CMD_FLUSH, 0, 0, 1), &RW), Some(22));
    assert_eq!(errno(req(99, 0, 0, 0), &RW), Some(22));
    assert_eq!(errno(req(CMD_READ, 1 << 15, 0, 1), &RW), Some(22));
}

#[test]
fn simple_replies() {
    let e = Reply::error(Errno::EIO, "boom").encode(9, false);
    assert_eq!(
        e.head,
        [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9]
    );
    assert!(e.body.is_empty());
    let d = Reply::Data {
        offset: 0,
        data: vec![1, 2],
    }
    .encode(9, false);
    assert_eq!(d.head[4..8], [0, 0, 0, 0]);
    assert_eq!(d.body, [1, 2]);
}

#[test]
fn structured_replies() {
    let d = Reply::Data {
        offset: 512,
        data: vec![0xaa; 3],
    }
    .encode(1, true);
    assert_eq!(
        d.head,
        [
            0x66, 0x8e, 0x33, 0xef, // magic
            0, 1, // flags: DONE
            0, 1, // type: OFFSET_DATA
            0, 0, 0, 0, 0, 0, 0, 1, // cookie
            0, 0, 0, 11, // length: offset + 3 bytes
            0, 0, 0, 0, 0, 0, 2, 0, // offset 512
        ]
    );
    let e = Reply::error(Errno::EINVAL, "no").encode(1, true);
    assert_eq!(&e.head[6..8], &[0x80, 0x01]);
    assert_eq!(&e.head[16..], &[0, 0, 0, 8, 0, 0, 0, 22, 0, 2, b'n', b'o']);
    let s = Reply::Extents(vec![ContextStatus {
        context: 1,
        descriptors: vec![(4096, 3)],
    }])
    .encode(1, true);
    assert_eq!(
        &s.head[16..],
        &[0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 16, 0, 0, 0, 0, 3]
    );
    let n = Reply::Done.encode(1, true);
    assert_eq!(n.head, none_chunk(1));
}

#[test]
fn long_messages_are_cut_on_a_char_boundary() {
    let msg = "é".repeat(3000);
    let e = error_chunk(1, Errno::EIO, &msg);
    let n = u16::from_be_bytes([e[24], e[25]]) as usize;
    assert!(n <= 4096 && n % 2 == 0);
    assert_eq!(e.len(), 26 + n);
}

#[test]
fn option_header_and_cursor() {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[..8].copy_from_slice(&OPT_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
    b[12..16].copy_from_slice(&6u32.to_be_bytes());
    let h = OptionHeader::parse(&b).unwrap();
    assert_eq!((h.option, h.len), (OPT_GO, 6));
    b[0] ^= 1;
    assert!(OptionHeader::parse(&b).is_err());

    let data = [0, 0, 0, 2, b'h', b'i', 0, 1, 0, 3];
    let mut c = Cursor::new(&data);
    assert_eq!(c.string(), Some(&b"hi"[..]));
    assert_eq!(c.u16(), Some(1));
    assert_eq!(c.u16(), Some(3));
    assert_eq!(c.remaining(), 0);
    assert_eq!(c.u16(), None);
    // A length that runs past the end is refused, not trusted.
    assert_eq!(Cursor::new(&[0xff, 0xff, 0xff, 0xff, 1]).string(), None);
}
