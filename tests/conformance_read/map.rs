//! Comparing `qcow2 map` with `qemu-img map` JSON, tolerating only the known host-hole
//! difference; and a test of that comparison itself.

use super::check::*;

/// One extent of a JSON map.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MapExtent {
    pub(super) start: u64,
    pub(super) length: u64,
    pub(super) depth: u64,
    pub(super) present: bool,
    pub(super) zero: bool,
    pub(super) data: bool,
    pub(super) compressed: bool,
    pub(super) offset: Option<u64>,
}

pub(super) fn parse_map(text: &str) -> Result<Vec<MapExtent>, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("bad JSON map: {e}\n{text}"))?;
    let arr = v.as_array().ok_or("map is not an array")?;
    arr.iter()
        .map(|e| {
            let u = |k: &str| e[k].as_u64().ok_or(format!("no {k} in {e}"));
            let b = |k: &str| e[k].as_bool().ok_or(format!("no {k} in {e}"));
            Ok(MapExtent {
                start: u("start")?,
                length: u("length")?,
                depth: u("depth")?,
                present: b("present")?,
                zero: b("zero")?,
                data: b("data")?,
                compressed: b("compressed")?,
                offset: e["offset"].as_u64(),
            })
        })
        .collect()
}

/// The extent of `map` containing guest offset `off`.
pub(super) fn extent_at(map: &[MapExtent], off: u64) -> Option<&MapExtent> {
    map.iter()
        .find(|e| e.start <= off && off < e.start + e.length)
}

/// Compare our JSON map text with QEMU's; tolerate (and describe) only the known host-hole
/// difference.
pub(super) fn compare_maps(ours: &str, theirs: &str) -> Result<MapOutcome, String> {
    if ours == theirs {
        return Ok(MapOutcome::Same);
    }
    let first_line = ours
        .lines()
        .zip(theirs.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(ours.lines().count().min(theirs.lines().count()));
    let show = format!(
        "first differing line {}:\n  ours:   {}\n  theirs: {}",
        first_line + 1,
        ours.lines().nth(first_line).unwrap_or("<none>"),
        theirs.lines().nth(first_line).unwrap_or("<none>")
    );
    let (a, b) = (parse_map(ours)?, parse_map(theirs)?);
    let mut cuts: Vec<u64> = a
        .iter()
        .chain(&b)
        .flat_map(|e| [e.start, e.start + e.length])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut known = Vec::new();
    for w in cuts.windows(2) {
        let (s, e) = (w[0], w[1]);
        let (x, y) = match (extent_at(&a, s), extent_at(&b, s)) {
            (Some(x), Some(y)) => (x, y),
            _ => return Err(format!("maps cover different ranges at {s}; {show}")),
        };
        let xo = x.offset.map(|o| o + (s - x.start));
        let yo = y.offset.map(|o| o + (s - y.start));
        let same = x.depth == y.depth
            && x.present == y.present
            && x.zero == y.zero
            && x.data == y.data
            && x.compressed == y.compressed
            && xo == yo;
        if same {
            continue;
        }
        let host_hole = x.depth == y.depth
            && x.present
            && y.present
            && x.data
            && y.data
            && x.zero
            && !y.zero
            && !x.compressed
            && !y.compressed
            && xo == yo;
        if host_hole {
            known.push(format!("[{s}, {e})"));
        } else {
            return Err(format!(
                "guest range [{s}, {e}): ours {x:?}, theirs {y:?}; {show}"
            ));
        }
    }
    if known.is_empty() {
        // Same extents, different text (e.g. different merging or formatting).
        return Err(format!("same extents, different text; {show}"));
    }
    Ok(MapOutcome::KnownHostHoles(format!(
        "ours zero:true where qemu says zero:false in {}",
        known.join(" ")
    )))
}

// ---------------------------------------------------------------------------------------------
// The checker itself

#[test]
fn map_comparison_classifies_differences() {
    let line = |s: u64, l: u64, zero: bool, off: u64| {
        format!(
            "{{ \"start\": {s}, \"length\": {l}, \"depth\": 0, \"present\": true, \"zero\": {zero}, \"data\": true, \"compressed\": false, \"offset\": {off}}}"
        )
    };
    let theirs = format!("[{}]\n", line(0, 65536, false, 327680));
    assert!(matches!(
        compare_maps(&theirs, &theirs),
        Ok(MapOutcome::Same)
    ));
    let holes = format!(
        "[{},\n{}]\n",
        line(0, 4096, true, 327680),
        line(4096, 61440, false, 331776)
    );
    assert!(matches!(
        compare_maps(&holes, &theirs),
        Ok(MapOutcome::KnownHostHoles(_))
    ));
    let moved = format!("[{}]\n", line(0, 65536, false, 393216));
    assert!(compare_maps(&moved, &theirs).is_err());
    let hole_elsewhere = format!(
        "[{},\n{}]\n",
        line(0, 4096, true, 0),
        line(4096, 61440, false, 331776)
    );
    assert!(compare_maps(&hole_elsewhere, &theirs).is_err());
    assert!(diff(b"abcd", b"abxd", 10).unwrap().contains("offset 12"));
    assert!(diff(b"abc", b"abcd", 0).unwrap().contains("length 3"));
    assert_eq!(diff(b"abc", b"abc", 0), None);
}
