use super::*;
use http::HeaderMap;
use proptest::prelude::*;

fn parsed(bytes: &[u8], head_request: bool) -> (Result<Option<Head>, Invalid>, BytesMut) {
    let mut buf = BytesMut::from(bytes);
    let head = head(
        &mut buf,
        head_request,
        &mut Vec::new(),
        &mut BytesMut::new(),
    );
    (head, buf)
}

/// The lines a head forwards, as text.
fn forwarded(head: &Head) -> Vec<(String, String)> {
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    head.response
        .body()
        .iter()
        .map(|(name, value)| (text(name), text(value)))
        .collect()
}

fn whole(bytes: &[u8]) -> (Head, BytesMut) {
    let (head, rest) = parsed(bytes, false);
    (head.expect("valid").expect("complete"), rest)
}

#[test]
fn a_head_leaves_its_body_in_the_buffer() {
    let (head, rest) = whole(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok");
    assert_eq!(head.response.status(), 200);
    assert_eq!(head.response.version(), Version::HTTP_11);
    let lines = [("X-A", "1"), ("X-A", "2")];
    assert_eq!(forwarded(&head), lines.map(|(n, v)| (n.into(), v.into())));
    assert_eq!(head.response.body().content_length(), Some(2));
    assert_eq!(head.framing, Framing::Length(2));
    assert!(!head.last);
    assert_eq!(&rest[..], b"ok");
}

#[test]
fn lines_are_forwarded_as_sent_in_name_case_and_value() {
    let (head, _) = whole(
        b"HTTP/1.1 200 OK\r\nDATE: d\r\nx-lower: a  b \r\nConnection: keep-alive\r\n\
          ETag:\t\"e\"\nX-Empty:\r\nContent-Length: 0\r\n\r\n",
    );
    let lines = [
        ("DATE", "d"),
        ("x-lower", "a  b"),
        ("ETag", "\"e\""),
        ("X-Empty", ""),
    ];
    assert_eq!(forwarded(&head), lines.map(|(n, v)| (n.into(), v.into())));
    // Whole lines, each ending in CRLF, whatever ended them on the way in.
    assert_eq!(
        &head.response.body().lines()[..],
        b"DATE: d\r\nx-lower: a  b\r\nETag:\t\"e\"\r\nX-Empty:\r\n"
    );
    assert_eq!(head.response.body().content_length(), Some(0));
    assert!(head.response.body().has_date());
    let (head, _) = whole(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert!(!head.response.body().has_date());
}

#[test]
fn hop_by_hop_lines_are_not_forwarded_and_say_what_they_say() {
    let (head, _) = whole(
        b"HTTP/1.1 200 OK\r\nX-Secret: 1\r\nConnection: keep-alive, x-secret\r\n\
          Keep-Alive: timeout=5, max=7\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\
          Upgrade: h2c\r\n\r\n",
    );
    let kept = [("X-Kept".to_string(), "yes".to_string())];
    assert_eq!(forwarded(&head), kept);
    assert!(head.hop.keep_alive && !head.hop.close);
    assert_eq!((head.hop.timeout, head.hop.max), (Some(5), Some(7)));
    assert_eq!(head.framing, Framing::Chunked(Chunked::Size));
    let (head, _) = whole(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    assert!(head.hop.close && !head.hop.keeps_alive(Version::HTTP_11));
    assert!(forwarded(&head).is_empty());
}

#[test]
fn the_length_is_noted_once_and_its_lines_not_forwarded() {
    let (head, _) = whole(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\ncontent-length: 5\r\n\r\n");
    assert_eq!(head.response.body().content_length(), Some(5));
    assert!(
        forwarded(&head).is_empty(),
        "written once, by the client's head"
    );
    let (head, _) =
        whole(b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n");
    assert_eq!(head.framing, Framing::Length(5));
    assert_eq!(head.response.body().content_length(), Some(5));
    assert!(forwarded(&head).is_empty());
}

#[test]
fn interim_responses_are_skipped() {
    let (head, rest) = whole(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
          HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(head.response.status(), 201);
    assert!(forwarded(&head).iter().all(|(name, _)| name != "Link"));
    assert!(rest.is_empty());
}

#[test]
fn a_partial_head_waits_and_an_endless_one_is_refused() {
    assert!(matches!(
        parsed(b"HTTP/1.1 200 OK\r\nContent-Le", false).0,
        Ok(None)
    ));
    let mut endless = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    endless.resize(MAX_HEAD + 1, b'a');
    assert_eq!(parsed(&endless, false).0.err(), Some(Invalid));
    assert_eq!(
        parsed(b"HTTP/1.1 2x0 OK\r\n\r\n", false).0.err(),
        Some(Invalid)
    );
    assert_eq!(
        parsed(b"SSH-2.0-OpenSSH\r\n\r\n", false).0.err(),
        Some(Invalid)
    );
}

#[test]
fn many_header_lines_parse_up_to_the_limit() {
    let head_with = |n: usize| {
        let mut text = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..n {
            text.extend_from_slice(format!("X-{i}: {i}\r\n").as_bytes());
        }
        text.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        text
    };
    let (head, _) = whole(&head_with(FEW_HEADERS * 2));
    assert_eq!(forwarded(&head).len(), FEW_HEADERS * 2);
    // A hop-by-hop line far down a head is marked and left out like the first.
    let mut text = head_with(MAX_HEADERS - 2);
    let at = text.len() - b"Content-Length: 0\r\n\r\n".len();
    text.splice(at..at, b"Keep-Alive: timeout=5\r\n".iter().copied());
    let (head, _) = whole(&text);
    assert_eq!(forwarded(&head).len(), MAX_HEADERS - 2);
    assert_eq!(head.hop.timeout, Some(5));
    assert_eq!(
        parsed(&head_with(MAX_HEADERS), false).0.err(),
        Some(Invalid)
    );
}

#[test]
fn framing_follows_rfc_9112() {
    let framing_of = |text: &[u8], head_request: bool| {
        let (head, _) = parsed(text, head_request);
        head.map(|h| h.map(|h| (h.framing, h.last)))
    };
    let length = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
    assert_eq!(
        framing_of(length, true),
        Ok(Some((Framing::Length(0), false)))
    );
    for code in [204, 304] {
        let text = format!("HTTP/1.1 {code} X\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(
            framing_of(text.as_bytes(), false),
            Ok(Some((Framing::Length(0), false)))
        );
    }
    let chunked = Framing::Chunked(Chunked::Size);
    let both = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(framing_of(both, false), Ok(Some((chunked.clone(), true))));
    let (head, _) = whole(both);
    assert!(
        forwarded(&head).is_empty() && head.response.body().content_length().is_none(),
        "a proxy removes the Content-Length a Transfer-Encoding overrides"
    );
    let te = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
    assert_eq!(framing_of(te, false), Ok(Some((chunked, false))));
    let gzip = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
    assert_eq!(
        framing_of(gzip, false),
        Ok(Some((Framing::UntilClose, true)))
    );
    let none = b"HTTP/1.0 200 OK\r\n\r\n";
    assert_eq!(
        framing_of(none, false),
        Ok(Some((Framing::UntilClose, true)))
    );
    let same = b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n";
    assert_eq!(
        framing_of(same, false),
        Ok(Some((Framing::Length(5), false)))
    );
    let differ = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
    assert_eq!(framing_of(differ, false), Err(Invalid));
    let signed = b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n";
    assert_eq!(framing_of(signed, false), Err(Invalid));
    let switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n";
    assert_eq!(
        framing_of(switching, false),
        Ok(Some((Framing::Length(0), true)))
    );
}

/// Runs the chunked reader over `wire` handed over `piece` bytes at a time.
fn dechunk(wire: &[u8], piece: usize) -> Result<(Vec<u8>, Option<HeaderMap>, BytesMut), Invalid> {
    let mut chunked = Chunked::Size;
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let (mut data, mut trailers) = (Vec::new(), None);
    for _ in 0..wire.len() * 2 + 4 {
        match chunked.step(&mut buf, &[])? {
            Step::Data(bytes) => data.extend_from_slice(&bytes),
            Step::Trailers(t) => trailers = Some(t),
            Step::End => return Ok((data, trailers, buf)),
            Step::NeedMore if fed == wire.len() => return Err(Invalid),
            Step::NeedMore => {
                let next = (fed + piece).min(wire.len());
                buf.extend_from_slice(&wire[fed..next]);
                fed = next;
            }
        }
    }
    panic!("the chunked reader did not finish");
}

#[test]
fn chunked_bodies_end_at_the_last_chunk_and_keep_their_trailers() {
    let wire = b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Sum: 6\r\n\r\nNEXT";
    let (data, trailers, rest) = dechunk(wire, 3).expect("valid");
    assert_eq!(data, b"hello!");
    assert_eq!(trailers.expect("trailers")["x-sum"], "6");
    assert!(
        b"NEXT".starts_with(&rest),
        "only the bytes after the body stay"
    );
    let (_, _, rest) = dechunk(wire, wire.len()).expect("valid");
    assert_eq!(&rest[..], b"NEXT");
    assert_eq!(dechunk(b"zz\r\n", 4).err(), Some(Invalid));
    assert_eq!(dechunk(b"\r\n\r\n", 4).err(), Some(Invalid));
    assert_eq!(dechunk(b";ext\r\n\r\n", 4).err(), Some(Invalid));
    assert_eq!(dechunk(b"2\r\nabXY0\r\n\r\n", 4).err(), Some(Invalid));
}

proptest! {
    #[test]
    fn chunked_reader_returns_what_was_chunked(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..50), 0..8),
        piece in 1usize..40,
        trailer in any::<bool>(),
    ) {
        let mut wire = Vec::new();
        for chunk in &chunks {
            wire.extend_from_slice(format!("{:X}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(if trailer { b"0\r\nX-T: 1\r\n\r\n" } else { b"0\r\n\r\n" });
        let (data, trailers, rest) = dechunk(&wire, piece).expect("valid");
        prop_assert_eq!(data, chunks.concat());
        prop_assert_eq!(trailers.is_some(), trailer);
        prop_assert!(rest.is_empty());
    }
}

/// A header line of a generated head: name, space after the colon, value, space after the
/// value, line end.
type GenLine = (
    &'static str,
    &'static str,
    String,
    &'static str,
    &'static str,
);

fn gen_line() -> impl Strategy<Value = GenLine> {
    let names = prop::sample::select(vec![
        "X-A",
        "x-b",
        "ETag",
        "Date",
        "Connection",
        "Keep-Alive",
        "TE",
        "Upgrade",
        "Proxy-Connection",
        "Server",
        "Transfer-Encoding",
    ]);
    let spaces = prop::sample::select(vec!["", " ", "\t", "  "]);
    let values = prop::sample::select(vec![
        "",
        "keep-alive",
        "x-a",
        "X-B, close",
        "a b",
        "v",
        "content-length",
    ]);
    let ends = prop::sample::select(vec!["\r\n", "\n"]);
    (
        names,
        spaces.clone(),
        values.prop_map(String::from),
        spaces,
        ends,
    )
}

proptest! {
    #[test]
    fn forwarded_lines_are_the_end_to_end_ones_each_ending_in_crlf(
        lines in proptest::collection::vec(gen_line(), 0..12),
    ) {
        let mut text = b"HTTP/1.1 200 OK\r\n".to_vec();
        for (name, before, value, after, end) in &lines {
            text.extend_from_slice(format!("{name}:{before}{value}{after}{end}").as_bytes());
        }
        text.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        let (head, rest) = whole(&text);
        prop_assert!(rest.is_empty());
        // What a reader of RFC 9110 §7.6.1 expects: no hop-by-hop line, and no line that a
        // `Connection` line lists, before or after it.
        let hop = [
            "connection",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-connection",
            "transfer-encoding",
        ];
        let listed: Vec<String> = lines
            .iter()
            .filter(|l| l.0 == "Connection")
            .flat_map(|l| l.2.split(',').map(|t| t.trim().to_ascii_lowercase()))
            .collect();
        let mut expected = Vec::new();
        let mut block = String::new();
        for (name, before, value, after, _) in &lines {
            let lower = name.to_ascii_lowercase();
            if !hop.contains(&lower.as_str()) && !listed.contains(&lower) {
                expected.push((name.to_string(), value.clone()));
                // Space after a value is dropped; with no value, it is all space after the
                // colon, which is kept.
                let after = if value.is_empty() { after } else { "" };
                block.push_str(&format!("{name}:{before}{value}{after}\r\n"));
            }
        }
        // The length goes apart from the lines, unless a Transfer-Encoding overrides it.
        let length = !lines.iter().any(|l| l.0 == "Transfer-Encoding");
        prop_assert_eq!(head.response.body().content_length(), length.then_some(0));
        prop_assert_eq!(forwarded(&head), expected);
        prop_assert_eq!(&head.response.body().lines()[..], block.as_bytes());
        prop_assert_eq!(
            head.response.body().has_date(),
            !listed.contains(&"date".to_string()) && lines.iter().any(|l| l.0 == "Date")
        );
    }
}
