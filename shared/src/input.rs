//! Streaming record readers for `coordinator prepare --from-file`.
//!
//! A [`RecordReader`] turns a JSONL or CSV stream into [`InputRecord`]s one at a time, in
//! constant memory: only the current record (bounded by
//! [`ReaderOptions::max_payload_bytes`]) is ever held. Every rejected record is reported as an
//! [`InputError`] naming its 1-based line, and the iterator stops after the first error.
//!
//! Payloads are checked to be acceptable to PostgreSQL: valid UTF-8, no NUL characters (raw or
//! as a `\u0000` escape) and no unpaired UTF-16 surrogate escapes, which `jsonb` rejects.
//!
//! ```no_run
//! use std::io::BufReader;
//! use tally::input::{Format, HashingReader, ReaderOptions, RecordReader};
//!
//! let file = std::fs::File::open("records.jsonl")?;
//! let hashing = HashingReader::new(file);
//! let digest = hashing.digest_handle();
//! let reader = RecordReader::new(BufReader::new(hashing), ReaderOptions::new(Format::Jsonl, "id"));
//! for record in reader {
//!     let record = record?;
//!     println!("line {}: {} -> {}", record.line, record.id, record.payload);
//! }
//! println!("sha256 of the input: {}", digest.hex());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashSet;
use std::fmt;
use std::io::{self, BufRead, Read};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{BufMut, BytesMut};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::Deserializer as _;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// Default largest accepted payload, in bytes (1 MiB).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Default largest accepted record id, in bytes.
pub const DEFAULT_MAX_ID_BYTES: usize = 1024;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Capacity of the buffer the `csv` crate reads through.
const CSV_BUFFER_BYTES: usize = 64 * 1024;

/// How many CSV column names an error message lists before eliding the rest.
const MAX_LISTED_COLUMNS: usize = 50;

/// The layout of an input stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row naming the fields.
    Csv,
}

impl Format {
    /// The name used on the command line: `jsonl` or `csv`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name other than `jsonl` or `csv`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown input format \"{0}\": expected jsonl or csv")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    /// Parses `jsonl` or `csv`, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("jsonl") {
            Ok(Format::Jsonl)
        } else if s.eq_ignore_ascii_case("csv") {
            Ok(Format::Csv)
        } else {
            Err(UnknownFormat(s.to_string()))
        }
    }
}

/// One record read from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    /// 1-based line of the input where the record starts.
    pub line: u64,
    /// The record id: the id field's string value, or an integer's decimal text.
    pub id: String,
    /// The whole record as JSON object text, acceptable to PostgreSQL `jsonb`. For JSONL this
    /// is the original line without surrounding whitespace; for CSV it is
    /// `{"header": "value", ...}` with every value a string.
    pub payload: String,
}

/// What to read and the limits to enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderOptions {
    /// JSONL or CSV.
    pub format: Format,
    /// The JSON field (or CSV column) holding each record's id.
    pub id_field: String,
    /// Largest accepted payload, in bytes of its JSON text.
    pub max_payload_bytes: usize,
    /// Largest accepted id, in bytes of UTF-8.
    pub max_id_bytes: usize,
}

impl ReaderOptions {
    /// Options with the default limits ([`DEFAULT_MAX_PAYLOAD_BYTES`], [`DEFAULT_MAX_ID_BYTES`]).
    pub fn new(format: Format, id_field: impl Into<String>) -> Self {
        ReaderOptions {
            format,
            id_field: id_field.into(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_id_bytes: DEFAULT_MAX_ID_BYTES,
        }
    }
}

/// Why an input could not be read. Every variant except `Io`, `Empty` and `Rejected` names the
/// 1-based line of the offending record (see [`InputError::line`]).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Reading the underlying stream failed.
    #[error("reading the input failed: {0}")]
    Io(#[from] io::Error),
    /// The input holds no record at all.
    #[error("input is empty: no records")]
    Empty,
    /// A JSONL line is not valid JSON.
    #[error("line {line}: malformed JSON: {message}")]
    MalformedJson { line: u64, message: String },
    /// A JSONL line is valid JSON but not an object.
    #[error("line {line}: expected a JSON object, found {found}")]
    NotAnObject { line: u64, found: &'static str },
    /// The record has no id field.
    #[error("line {line}: field \"{field}\" is missing")]
    MissingId { line: u64, field: String },
    /// A JSON object has the id field more than once.
    #[error("line {line}: field \"{field}\" appears more than once")]
    DuplicateId { line: u64, field: String },
    /// The id field holds something other than a string or an integer.
    #[error("line {line}: id is {found}; the id field must be a string or an integer")]
    IdType { line: u64, found: &'static str },
    /// The id is the empty string.
    #[error("line {line}: id is empty")]
    EmptyId { line: u64 },
    /// The id is longer than [`ReaderOptions::max_id_bytes`].
    #[error("line {line}: id is {size} bytes, over the limit of {limit}")]
    IdTooLong { line: u64, size: u64, limit: usize },
    /// The payload is larger than [`ReaderOptions::max_payload_bytes`].
    #[error("line {line}: payload is {size} bytes, over the limit of {limit}")]
    PayloadTooLarge { line: u64, size: u64, limit: usize },
    /// A CSV record grew so large (typically because of an unclosed quote) that its payload
    /// cannot fit the limit; reading stopped without buffering the rest.
    #[error(
        "line {line}: CSV record is over {raw_limit} bytes, so its payload would exceed the limit \
         of {limit} (is a quote left unclosed?)"
    )]
    CsvRecordTooLarge {
        line: u64,
        raw_limit: u64,
        limit: usize,
    },
    /// The record is not valid UTF-8.
    #[error("line {line}: invalid UTF-8 {detail}")]
    InvalidUtf8 { line: u64, detail: String },
    /// The record contains U+0000, which PostgreSQL text and `jsonb` cannot store.
    #[error(
        "line {line}: {context} contains a NUL character (U+0000), which PostgreSQL cannot store"
    )]
    NulCharacter { line: u64, context: String },
    /// A JSON string has a `\uD800`-`\uDFFF` escape that is not part of a surrogate pair.
    #[error(
        "line {line}: a JSON string contains an unpaired surrogate escape (\\uD800-\\uDFFF), \
         which PostgreSQL rejects"
    )]
    UnpairedSurrogate { line: u64 },
    /// The CSV header has no column named like the id field.
    #[error("line {line}: CSV header has no column \"{field}\" (columns: {columns})")]
    MissingColumn {
        line: u64,
        field: String,
        columns: String,
    },
    /// The CSV header names a column twice.
    #[error("line {line}: CSV header has column \"{name}\" more than once")]
    DuplicateColumn { line: u64, name: String },
    /// A CSV row has a different number of fields than the header.
    #[error("line {line}: CSV row has {found} fields, the header has {expected}")]
    FieldCount {
        line: u64,
        found: u64,
        expected: u64,
    },
    /// Any other CSV syntax problem.
    #[error("line {line}: malformed CSV: {message}")]
    MalformedCsv { line: u64, message: String },
    /// An error prefixed with the name of the file it came from (see [`InputError::in_file`]).
    #[error("{file}: {inner}")]
    InFile {
        file: String,
        inner: Box<InputError>,
    },
    /// A rejection described elsewhere, message complete as it stands.
    #[error("{0}")]
    Rejected(String),
    /// Two records of one input share an id (found after loading, server-side).
    #[error(
        "line {line}: duplicate id {id:?}: an earlier record has the same id; ids must be \
         unique within a batch"
    )]
    RepeatedId { line: u64, id: String },
}

impl InputError {
    /// The 1-based input line the error is about, if it is about one.
    pub fn line(&self) -> Option<u64> {
        match self {
            InputError::Io(_) | InputError::Empty | InputError::Rejected(_) => None,
            InputError::InFile { inner, .. } => inner.line(),
            InputError::MalformedJson { line, .. }
            | InputError::NotAnObject { line, .. }
            | InputError::MissingId { line, .. }
            | InputError::DuplicateId { line, .. }
            | InputError::IdType { line, .. }
            | InputError::EmptyId { line }
            | InputError::IdTooLong { line, .. }
            | InputError::PayloadTooLarge { line, .. }
            | InputError::CsvRecordTooLarge { line, .. }
            | InputError::InvalidUtf8 { line, .. }
            | InputError::NulCharacter { line, .. }
            | InputError::UnpairedSurrogate { line }
            | InputError::MissingColumn { line, .. }
            | InputError::DuplicateColumn { line, .. }
            | InputError::FieldCount { line, .. }
            | InputError::MalformedCsv { line, .. }
            | InputError::RepeatedId { line, .. } => Some(*line),
        }
    }

    /// Prefixes the message with a file name: `data.jsonl: line 3: …`.
    pub fn in_file(self, file: &str) -> InputError {
        InputError::InFile {
            file: file.to_string(),
            inner: Box::new(self),
        }
    }
}

/// Reads [`InputRecord`]s from a buffered stream, one at a time.
///
/// Iterating yields `Ok` records in input order; the first problem is yielded as an `Err` and
/// ends the iteration. An input without any record yields [`InputError::Empty`] as its last
/// item. Duplicate ids are not detected here.
///
/// A UTF-8 byte order mark at the very start of the input is skipped.
pub struct RecordReader<R: BufRead> {
    source: Source<R>,
    options: ReaderOptions,
    records: u64,
    finished: bool,
}

enum Source<R: BufRead> {
    Jsonl(JsonlSource<R>),
    Csv(Box<CsvSource<R>>),
}

impl<R: BufRead> RecordReader<R> {
    /// A reader of `reader` in `options.format`. Nothing is read until the first `next()`.
    pub fn new(reader: R, options: ReaderOptions) -> Self {
        let source = match options.format {
            Format::Jsonl => Source::Jsonl(JsonlSource {
                reader,
                next_line: 1,
                at_start: true,
                buf: Vec::new(),
            }),
            Format::Csv => Source::Csv(Box::new(CsvSource::new(reader, &options))),
        };
        RecordReader {
            source,
            options,
            records: 0,
            finished: false,
        }
    }

    /// How many records were yielded so far.
    pub fn records_read(&self) -> u64 {
        self.records
    }

    /// The options this reader was made with.
    pub fn options(&self) -> &ReaderOptions {
        &self.options
    }

    /// The wrapped reader (for example to get at a [`HashingReader`] below it).
    pub fn get_ref(&self) -> &R {
        match &self.source {
            Source::Jsonl(s) => &s.reader,
            Source::Csv(s) => &s.csv.get_ref().inner,
        }
    }

    /// Unwraps the reader. Data the CSV parser buffered but had not used yet is lost.
    pub fn into_inner(self) -> R {
        match self.source {
            Source::Jsonl(s) => s.reader,
            Source::Csv(s) => s.csv.into_inner().inner,
        }
    }
}

impl<R: BufRead> Iterator for RecordReader<R> {
    type Item = Result<InputRecord, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let item = match &mut self.source {
            Source::Jsonl(s) => s.next_record(&self.options),
            Source::Csv(s) => s.next_record(&self.options),
        };
        match item {
            Some(Ok(record)) => {
                self.records += 1;
                Some(Ok(record))
            }
            Some(Err(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            None => {
                self.finished = true;
                if self.records == 0 {
                    Some(Err(InputError::Empty))
                } else {
                    None
                }
            }
        }
    }
}

impl<R: BufRead> std::iter::FusedIterator for RecordReader<R> {}

/// Calls `f` on the reader's buffered data (empty at end of input), retrying interruptions.
fn with_buf<R: BufRead, T>(reader: &mut R, f: impl FnOnce(&[u8]) -> T) -> io::Result<T> {
    loop {
        match reader.fill_buf() {
            Ok(buf) => return Ok(f(buf)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// JSON whitespace other than the line feed.
fn is_inline_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

/// Position of the last non-whitespace byte, plus one (0 when all whitespace).
fn trimmed_end(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rposition(|&b| !is_inline_ws(b))
        .map_or(0, |i| i + 1)
}

// ---------------------------------------------------------------------------------------------
// JSONL
// ---------------------------------------------------------------------------------------------

struct JsonlSource<R> {
    reader: R,
    /// Line number of the next line to read.
    next_line: u64,
    at_start: bool,
    /// The current line, from its first non-whitespace byte, at most `max_payload_bytes + 2`.
    buf: Vec<u8>,
}

/// What the start of a line turned out to be.
enum LineStart {
    Eof,
    Blank,
    /// Content follows, after this many bytes of whitespace (and BOM).
    Content(usize),
}

impl<R: BufRead> JsonlSource<R> {
    fn next_record(&mut self, options: &ReaderOptions) -> Option<Result<InputRecord, InputError>> {
        loop {
            let line = self.next_line;
            let leading = match self.skip_leading_whitespace() {
                Ok(LineStart::Eof) => return None,
                Ok(LineStart::Blank) => {
                    self.next_line += 1;
                    continue;
                }
                Ok(LineStart::Content(leading)) => leading,
                Err(e) => return Some(Err(e.into())),
            };
            self.next_line += 1;
            let size = match self.read_rest_of_line(options.max_payload_bytes) {
                Ok(size) => size,
                Err(e) => return Some(Err(e.into())),
            };
            if size > options.max_payload_bytes {
                return Some(Err(InputError::PayloadTooLarge {
                    line,
                    size: size as u64,
                    limit: options.max_payload_bytes,
                }));
            }
            let text = self.buf.get(..size).unwrap_or_default();
            return Some(parse_json_record(text, line, leading, options));
        }
    }

    /// Consumes whitespace (and, at the start of the input, a byte order mark) up to the first
    /// other byte; a blank line's line feed is consumed too.
    fn skip_leading_whitespace(&mut self) -> io::Result<LineStart> {
        let mut leading = 0usize;
        if self.at_start {
            let bom = with_buf(&mut self.reader, |buf| buf.starts_with(UTF8_BOM))?;
            self.at_start = false;
            if bom {
                self.reader.consume(UTF8_BOM.len());
                leading = UTF8_BOM.len();
            }
        }
        loop {
            let (skip, next) = with_buf(&mut self.reader, |buf| {
                let skip = buf.iter().position(|&b| !is_inline_ws(b));
                match skip {
                    Some(n) => (n, buf.get(n).copied()),
                    None => (buf.len(), None),
                }
            })?;
            leading += skip;
            match next {
                Some(b'\n') => {
                    self.reader.consume(skip + 1);
                    return Ok(LineStart::Blank);
                }
                Some(_) => {
                    self.reader.consume(skip);
                    return Ok(LineStart::Content(leading));
                }
                None if skip == 0 => return Ok(LineStart::Eof),
                None => self.reader.consume(skip),
            }
        }
    }

    /// Reads the rest of the line into `buf` (at most `max + 2` bytes of it) and consumes its
    /// line feed; returns the line's length without trailing whitespace. When that is at most
    /// `max`, `buf` holds all of it.
    fn read_rest_of_line(&mut self, max: usize) -> io::Result<usize> {
        self.buf.clear();
        let cap = max.saturating_add(2);
        (&mut self.reader)
            .take(cap as u64)
            .read_until(b'\n', &mut self.buf)?;
        if self.buf.last() == Some(&b'\n') {
            let len = self.buf.len() - 1;
            return Ok(trimmed_end(self.buf.get(..len).unwrap_or_default()));
        }
        if self.buf.len() < cap {
            // End of input without a final line feed.
            return Ok(trimmed_end(&self.buf));
        }
        // Too long to keep: measure the rest without storing it.
        let mut end = trimmed_end(&self.buf);
        let mut offset = self.buf.len();
        loop {
            let (len, newline, last) = with_buf(&mut self.reader, |chunk| {
                let newline = chunk.iter().position(|&b| b == b'\n');
                let len = newline.unwrap_or(chunk.len());
                let last = trimmed_end(chunk.get(..len).unwrap_or_default());
                (len, newline.is_some(), last)
            })?;
            if last > 0 {
                end = offset + last;
            }
            offset += len;
            self.reader.consume(len + usize::from(newline));
            if newline || len == 0 {
                return Ok(end);
            }
        }
    }
}

/// Validates one JSONL line (already trimmed, non-empty) and extracts its id.
fn parse_json_record(
    bytes: &[u8],
    line: u64,
    leading: usize,
    options: &ReaderOptions,
) -> Result<InputRecord, InputError> {
    let text = std::str::from_utf8(bytes).map_err(|e| InputError::InvalidUtf8 {
        line,
        detail: format!("at column {}", leading + e.valid_up_to() + 1),
    })?;
    let first = bytes.first().copied().unwrap_or(b' ');
    if first != b'{' {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Err(e) => malformed_json(line, leading, &e),
            Ok(_) => InputError::NotAnObject {
                line,
                found: json_kind(first),
            },
        });
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let found = (&mut de)
        .deserialize_map(ObjectVisitor {
            field: &options.id_field,
        })
        .and_then(|found| de.end().map(|()| found))
        .map_err(|e| malformed_json(line, leading, &e))?;
    check_escapes(text, line)?;
    if found.duplicate {
        return Err(InputError::DuplicateId {
            line,
            field: options.id_field.clone(),
        });
    }
    let Some(raw) = found.id else {
        return Err(InputError::MissingId {
            line,
            field: options.id_field.clone(),
        });
    };
    let id = id_from_raw(raw.get(), line)?;
    check_id(&id, line, options)?;
    Ok(InputRecord {
        line,
        id,
        payload: text.to_string(),
    })
}

/// A serde_json error as "<what> at column <n>", with the column counted in the original line.
fn malformed_json(line: u64, leading: usize, err: &serde_json::Error) -> InputError {
    let full = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    let what = full.strip_suffix(&suffix).unwrap_or(&full);
    let what = match what.strip_prefix("EOF while") {
        Some(rest) => format!("unexpected end of line while{rest}"),
        None => what.to_string(),
    };
    InputError::MalformedJson {
        line,
        message: format!("{what} at column {}", leading + err.column()),
    }
}

/// The kind of JSON value starting with `first`, for messages.
fn json_kind(first: u8) -> &'static str {
    match first {
        b'{' => "an object",
        b'[' => "an array",
        b'"' => "a string",
        b'-' | b'0'..=b'9' => "a number",
        b't' | b'f' => "a boolean",
        b'n' => "null",
        _ => "an unknown value",
    }
}

/// What a JSON object holds under the id field.
struct Found<'de> {
    id: Option<&'de RawValue>,
    duplicate: bool,
}

/// Walks a JSON object without building it, keeping the raw id value.
struct ObjectVisitor<'f> {
    field: &'f str,
}

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = Found<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = Found {
            id: None,
            duplicate: false,
        };
        while let Some(is_id) = map.next_key_seed(KeyIs(self.field))? {
            if is_id {
                let raw: &'de RawValue = map.next_value()?;
                if found.id.is_some() {
                    found.duplicate = true;
                } else {
                    found.id = Some(raw);
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Deserializes an object key into "is it the id field?", without allocating.
struct KeyIs<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

/// The id from its raw JSON value: a string's contents or an integer's decimal text.
fn id_from_raw(raw: &str, line: u64) -> Result<String, InputError> {
    let kind = match raw.as_bytes().first() {
        Some(b'"') => {
            if !raw.contains('\\') {
                if let Some(inner) = raw.get(1..raw.len().saturating_sub(1)) {
                    return Ok(inner.to_string());
                }
            }
            return serde_json::from_str::<String>(raw).map_err(|e| malformed_json(line, 0, &e));
        }
        Some(b'-' | b'0'..=b'9') => {
            if raw.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
                "a float"
            } else if raw == "-0" {
                return Ok("0".to_string());
            } else {
                return Ok(raw.to_string());
            }
        }
        Some(&first) => json_kind(first),
        None => "an unknown value",
    };
    Err(InputError::IdType { line, found: kind })
}

/// Rejects empty and oversized ids.
fn check_id(id: &str, line: u64, options: &ReaderOptions) -> Result<(), InputError> {
    if id.is_empty() {
        return Err(InputError::EmptyId { line });
    }
    if id.len() > options.max_id_bytes {
        return Err(InputError::IdTooLong {
            line,
            size: id.len() as u64,
            limit: options.max_id_bytes,
        });
    }
    Ok(())
}

/// The value of four hex digits at `at`, if there are four.
fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = bytes.get(at..at.checked_add(4)?)?;
    digits.iter().try_fold(0u32, |acc, &b| {
        let v = char::from(b).to_digit(16)?;
        Some(acc * 16 + v)
    })
}

/// In valid JSON text, rejects `\u0000` and unpaired surrogate escapes, which `jsonb` refuses.
fn check_escapes(text: &str, line: u64) -> Result<(), InputError> {
    let bytes = text.as_bytes();
    let mut at = 0usize;
    while let Some(offset) = text.get(at..).and_then(|rest| rest.find('\\')) {
        let p = at + offset;
        if bytes.get(p + 1) != Some(&b'u') {
            at = p + 2;
            continue;
        }
        at = p + 6;
        match hex4(bytes, p + 2) {
            Some(0) => {
                return Err(InputError::NulCharacter {
                    line,
                    context: "a JSON string".to_string(),
                })
            }
            Some(0xD800..=0xDBFF) => {
                let paired = bytes.get(p + 6..p + 8) == Some(b"\\u".as_slice())
                    && matches!(hex4(bytes, p + 8), Some(0xDC00..=0xDFFF));
                if !paired {
                    return Err(InputError::UnpairedSurrogate { line });
                }
                at = p + 12;
            }
            Some(0xDC00..=0xDFFF) => return Err(InputError::UnpairedSurrogate { line }),
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------------------------

struct CsvSource<R: BufRead> {
    csv: csv::Reader<LineTracker<R>>,
    record: csv::ByteRecord,
    header: Option<CsvHeader>,
}

struct CsvHeader {
    names: Vec<String>,
    /// Each name as a JSON object key: `"name":`.
    keys: Vec<String>,
    keys_len: usize,
    id_index: usize,
}

impl<R: BufRead> CsvSource<R> {
    fn new(reader: R, options: &ReaderOptions) -> Self {
        // A CSV record's payload is at least about half its raw size, so a record this large
        // cannot fit; stop reading it rather than buffer it whole.
        let raw_limit = (options.max_payload_bytes as u64)
            .saturating_mul(2)
            .saturating_add(64);
        let csv = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .buffer_capacity(CSV_BUFFER_BYTES)
            .from_reader(LineTracker::new(reader, raw_limit));
        CsvSource {
            csv,
            record: csv::ByteRecord::new(),
            header: None,
        }
    }

    fn next_record(&mut self, options: &ReaderOptions) -> Option<Result<InputRecord, InputError>> {
        if self.header.is_none() {
            match self.read_header(options) {
                Ok(Some(header)) => self.header = Some(header),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
        match self.csv.read_byte_record(&mut self.record) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => return Some(Err(self.csv_error(e, options))),
        }
        let line = self.finish_record();
        let header = self.header.as_ref()?;
        Some(csv_record(header, &self.record, line, options))
    }

    /// The start line of the record just read; starts tracking the next one.
    fn finish_record(&mut self) -> u64 {
        let line = self.csv.get_ref().start_line;
        let pos = self.csv.position().clone();
        self.csv.get_mut().begin_record(pos.byte(), pos.line());
        line
    }

    /// Reads and checks the header; `None` when the input has no header (it is empty).
    fn read_header(&mut self, options: &ReaderOptions) -> Result<Option<CsvHeader>, InputError> {
        let fields = match self.csv.byte_headers() {
            Ok(fields) => fields.clone(),
            Err(e) => return Err(self.csv_error(e, options)),
        };
        let line = self.finish_record();
        if fields.is_empty() {
            return Ok(None);
        }
        let mut names = Vec::with_capacity(fields.len());
        for (i, field) in fields.iter().enumerate() {
            let name = std::str::from_utf8(field).map_err(|_| InputError::InvalidUtf8 {
                line,
                detail: format!("in the name of CSV column {}", i + 1),
            })?;
            if name.contains('\0') {
                return Err(InputError::NulCharacter {
                    line,
                    context: "the CSV header".to_string(),
                });
            }
            names.push(name.to_string());
        }
        let mut seen = HashSet::with_capacity(names.len());
        for name in &names {
            if !seen.insert(name.as_str()) {
                return Err(InputError::DuplicateColumn {
                    line,
                    name: name.clone(),
                });
            }
        }
        let Some(id_index) = names.iter().position(|n| *n == options.id_field) else {
            let mut columns = names
                .iter()
                .take(MAX_LISTED_COLUMNS)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if names.len() > MAX_LISTED_COLUMNS {
                columns.push_str(&format!(", … ({} in all)", names.len()));
            }
            return Err(InputError::MissingColumn {
                line,
                field: options.id_field.clone(),
                columns,
            });
        };
        let keys: Vec<String> = names
            .iter()
            .map(|name| {
                let mut key = String::with_capacity(name.len() + 3);
                // Names were checked for NUL above.
                let _ = push_json_string(&mut key, name);
                key.push(':');
                key
            })
            .collect();
        let keys_len = keys.iter().map(String::len).sum();
        Ok(Some(CsvHeader {
            names,
            keys,
            keys_len,
            id_index,
        }))
    }

    fn csv_error(&self, err: csv::Error, options: &ReaderOptions) -> InputError {
        let tracker = self.csv.get_ref();
        let line = tracker.start_line;
        if tracker.tripped {
            return InputError::CsvRecordTooLarge {
                line,
                raw_limit: tracker.raw_limit,
                limit: options.max_payload_bytes,
            };
        }
        let message = err.to_string();
        match err.into_kind() {
            csv::ErrorKind::Io(e) => InputError::Io(e),
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => InputError::FieldCount {
                line,
                found: len,
                expected: expected_len,
            },
            _ => InputError::MalformedCsv { line, message },
        }
    }
}

/// Turns a CSV row into a record whose payload is `{"header": "value", ...}`.
fn csv_record(
    header: &CsvHeader,
    record: &csv::ByteRecord,
    line: u64,
    options: &ReaderOptions,
) -> Result<InputRecord, InputError> {
    let column = |i: usize| header.names.get(i).map_or("?", String::as_str);
    let mut payload =
        String::with_capacity(2 + header.keys_len + record.as_slice().len() + 3 * record.len());
    payload.push('{');
    let mut id = "";
    for (i, (field, key)) in record.iter().zip(&header.keys).enumerate() {
        let value = std::str::from_utf8(field).map_err(|e| InputError::InvalidUtf8 {
            line,
            detail: format!(
                "in column \"{}\" at byte {}",
                column(i),
                e.valid_up_to() + 1
            ),
        })?;
        if i > 0 {
            payload.push(',');
        }
        payload.push_str(key);
        if push_json_string(&mut payload, value).is_err() {
            return Err(InputError::NulCharacter {
                line,
                context: format!("column \"{}\"", column(i)),
            });
        }
        if i == header.id_index {
            id = value;
        }
    }
    payload.push('}');
    if payload.len() > options.max_payload_bytes {
        return Err(InputError::PayloadTooLarge {
            line,
            size: payload.len() as u64,
            limit: options.max_payload_bytes,
        });
    }
    check_id(id, line, options)?;
    Ok(InputRecord {
        line,
        id: id.to_string(),
        payload,
    })
}

/// Appends `s` as a JSON string literal; fails (leaving `out` partly written) on U+0000.
fn push_json_string(out: &mut String, s: &str) -> Result<(), ()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0 => return Err(()),
            1..=0x1f => "",
            _ => continue,
        };
        // `i` is an ASCII byte, so both slice ends are character boundaries.
        out.push_str(s.get(start..i).unwrap_or_default());
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
    Ok(())
}

/// Sits between the input and the `csv` crate: skips a byte order mark, finds the line where
/// each record really starts (the crate's own positions do not skip blank lines and count CRLF
/// line ends late), and stops a record that grows past `raw_limit` bytes.
///
/// The `csv` crate reads through a `BufReader` that refills only when drained, so when a record
/// ends, the unread rest of the input is a suffix of the last chunk delivered, kept in `chunk`.
struct LineTracker<R> {
    inner: R,
    started: bool,
    /// Bytes handed to the CSV parser so far.
    delivered: u64,
    /// Copy of the last chunk handed over, which started at byte `chunk_start`.
    chunk: Vec<u8>,
    chunk_start: u64,
    /// Still looking for the first byte of the current record (skipping line ends).
    seeking: bool,
    /// Line of the current record's first byte (so far, while seeking).
    start_line: u64,
    /// Offset of the current record's first byte, once found.
    start_byte: u64,
    raw_limit: u64,
    tripped: bool,
}

impl<R: BufRead> LineTracker<R> {
    fn new(inner: R, raw_limit: u64) -> Self {
        LineTracker {
            inner,
            started: false,
            delivered: 0,
            chunk: Vec::new(),
            chunk_start: 0,
            seeking: true,
            start_line: 1,
            start_byte: 0,
            raw_limit,
            tripped: false,
        }
    }

    /// The previous record ended at `byte`, on `line`: the next one starts at the first byte
    /// from there that is not a line end.
    fn begin_record(&mut self, byte: u64, line: u64) {
        self.start_line = line;
        self.start_byte = byte;
        self.seeking = true;
        match byte.checked_sub(self.chunk_start) {
            Some(offset) if byte <= self.delivered => {
                self.scan(usize::try_from(offset).unwrap_or(usize::MAX))
            }
            // Not expected; the parser's own position is the best guess.
            _ => self.seeking = false,
        }
    }

    fn scan(&mut self, from: usize) {
        for (i, &b) in self.chunk.iter().enumerate().skip(from) {
            match b {
                b'\n' => self.start_line += 1,
                b'\r' => {}
                _ => {
                    self.seeking = false;
                    self.start_byte = self.chunk_start + i as u64;
                    return;
                }
            }
        }
    }
}

impl<R: BufRead> Read for LineTracker<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.started {
            let bom = with_buf(&mut self.inner, |buf| buf.starts_with(UTF8_BOM))?;
            self.started = true;
            if bom {
                self.inner.consume(UTF8_BOM.len());
            }
        }
        // The parser asks for more only once it used everything delivered, all of it part of
        // the current record.
        if !self.seeking && self.delivered.saturating_sub(self.start_byte) > self.raw_limit {
            self.tripped = true;
            return Err(io::Error::other("CSV record over the size limit"));
        }
        let chunk = &mut self.chunk;
        let n = with_buf(&mut self.inner, |buf| {
            let n = buf.len().min(out.len());
            let data = buf.get(..n).unwrap_or_default();
            if let Some(dest) = out.get_mut(..n) {
                dest.copy_from_slice(data);
            }
            chunk.clear();
            chunk.extend_from_slice(data);
            n
        })?;
        self.inner.consume(n);
        self.chunk_start = self.delivered;
        self.delivered += n as u64;
        if self.seeking {
            self.scan(0);
        }
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------------
// Fingerprinting and COPY encoding
// ---------------------------------------------------------------------------------------------

struct HashState {
    hasher: Sha256,
    bytes: u64,
}

/// Wraps a reader and feeds every byte read through it into SHA-256, to fingerprint an input.
///
/// It implements only `Read`: put it under a `BufReader`, e.g.
/// `RecordReader::new(BufReader::new(HashingReader::new(file)), options)`, and take a
/// [`DigestHandle`] first with [`HashingReader::digest_handle`] to read the digest after the
/// reader was moved away. The digest covers the whole input only once it was read to the end
/// (a [`RecordReader`] does that when it returns `None` without an error).
pub struct HashingReader<R> {
    inner: R,
    state: Arc<Mutex<HashState>>,
}

/// A shared view of a [`HashingReader`]'s running digest.
#[derive(Clone)]
pub struct DigestHandle {
    state: Arc<Mutex<HashState>>,
}

impl<R> HashingReader<R> {
    /// Wraps `inner`; nothing has been hashed yet.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            state: Arc::new(Mutex::new(HashState {
                hasher: Sha256::new(),
                bytes: 0,
            })),
        }
    }

    /// A handle that reads the digest of whatever this reader has read so far.
    pub fn digest_handle(&self) -> DigestHandle {
        DigestHandle {
            state: Arc::clone(&self.state),
        }
    }

    /// Lowercase hex SHA-256 of the bytes read so far.
    pub fn digest_hex(&self) -> String {
        self.digest_handle().hex()
    }

    /// How many bytes were read so far.
    pub fn bytes_read(&self) -> u64 {
        self.digest_handle().bytes()
    }

    /// The wrapped reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Unwraps the reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl DigestHandle {
    /// Lowercase hex SHA-256 of the bytes read so far.
    pub fn hex(&self) -> String {
        let hasher = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hasher
            .clone();
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// How many bytes were read so far.
    pub fn bytes(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bytes
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let Some(data) = buf.get(..n) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the reader returned more bytes than asked for",
            ));
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.hasher.update(data);
        state.bytes += n as u64;
        Ok(n)
    }
}

/// Appends one row in PostgreSQL `COPY ... FROM STDIN` text format: fields separated by tabs,
/// ended by a line feed, with backslash, tab, line feed and carriage return escaped as `\\`,
/// `\t`, `\n` and `\r`. Fields must not contain NUL (the readers reject it).
pub fn encode_copy_text_row(buf: &mut BytesMut, fields: &[&str]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b'\t');
        }
        let bytes = field.as_bytes();
        buf.reserve(bytes.len() + 1);
        let mut start = 0;
        for (j, &b) in bytes.iter().enumerate() {
            let escape: &[u8] = match b {
                b'\\' => b"\\\\",
                b'\t' => b"\\t",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                _ => continue,
            };
            buf.put_slice(bytes.get(start..j).unwrap_or_default());
            buf.put_slice(escape);
            start = j + 1;
        }
        buf.put_slice(bytes.get(start..).unwrap_or_default());
    }
    buf.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn options(format: Format) -> ReaderOptions {
        ReaderOptions::new(format, "id")
    }

    fn read_with(input: &[u8], options: ReaderOptions) -> Vec<Result<InputRecord, InputError>> {
        RecordReader::new(input, options).collect()
    }

    fn read(input: &[u8], format: Format) -> Vec<Result<InputRecord, InputError>> {
        read_with(input, options(format))
    }

    /// All records of an input that must read without error.
    fn records(input: &[u8], format: Format) -> Vec<InputRecord> {
        read(input, format)
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("unexpected error: {e}")))
            .collect()
    }

    /// The error ending an input, checking everything before it was a record.
    fn error_with(input: &[u8], options: ReaderOptions) -> InputError {
        let mut results = read_with(input, options);
        let last = results.pop().expect("at least one item");
        assert!(
            results.iter().all(Result::is_ok),
            "only the last item may fail"
        );
        last.expect_err("the input must fail")
    }

    fn error(input: &[u8], format: Format) -> InputError {
        error_with(input, options(format))
    }

    fn jsonl_error(input: &str) -> (Option<u64>, String) {
        let e = error(input.as_bytes(), Format::Jsonl);
        (e.line(), e.to_string())
    }

    fn csv_error(input: &str) -> (Option<u64>, String) {
        let e = error(input.as_bytes(), Format::Csv);
        (e.line(), e.to_string())
    }

    // --- formats and options ---------------------------------------------------------------

    #[test]
    fn format_parses_and_displays() {
        assert_eq!("jsonl".parse::<Format>(), Ok(Format::Jsonl));
        assert_eq!("CSV".parse::<Format>(), Ok(Format::Csv));
        assert!("json".parse::<Format>().is_err());
        assert_eq!(Format::Jsonl.to_string(), "jsonl");
        assert_eq!(Format::Csv.to_string(), "csv");
        let defaults = ReaderOptions::new(Format::Csv, "key");
        assert_eq!(defaults.max_payload_bytes, 1024 * 1024);
        assert_eq!(defaults.max_id_bytes, 1024);
    }

    // --- JSONL -----------------------------------------------------------------------------

    #[test]
    fn jsonl_reads_records_with_their_lines() {
        let input =
            "{\"id\":\"a\",\"n\":1}\n\n   \n\t{\"x\":[1,{\"y\":null}], \"id\":42}  \r\n{\"id\":-7}";
        let got = records(input.as_bytes(), Format::Jsonl);
        assert_eq!(
            got,
            vec![
                InputRecord {
                    line: 1,
                    id: "a".into(),
                    payload: "{\"id\":\"a\",\"n\":1}".into()
                },
                InputRecord {
                    line: 4,
                    id: "42".into(),
                    payload: "{\"x\":[1,{\"y\":null}], \"id\":42}".into()
                },
                InputRecord {
                    line: 5,
                    id: "-7".into(),
                    payload: "{\"id\":-7}".into()
                },
            ]
        );
    }

    #[test]
    fn jsonl_tolerates_crlf_bom_and_final_blank_lines() {
        let got = records(
            b"\xEF\xBB\xBF{\"id\":\"a\"}\r\n{\"id\":\"b\"}\r\n\r\n",
            Format::Jsonl,
        );
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].line, got[0].payload.as_str()),
            (1, "{\"id\":\"a\"}")
        );
        assert_eq!(
            (got[1].line, got[1].payload.as_str()),
            (2, "{\"id\":\"b\"}")
        );
    }

    #[test]
    fn jsonl_ids_keep_any_text_and_unescape() {
        let got = records(
            br#"{"id":"it's \"quoted\"; DROP TABLE x;\t\\ \u00e9\ud83d\ude00 \u65e5"}"#,
            Format::Jsonl,
        );
        assert_eq!(got[0].id, "it's \"quoted\"; DROP TABLE x;\t\\ é😀 日");
        let big = records(
            br#"{"id":123456789012345678901234567890}
{"id":-0}"#,
            Format::Jsonl,
        );
        assert_eq!(big[0].id, "123456789012345678901234567890");
        assert_eq!(big[1].id, "0");
        // The id field is found by its unescaped name, anywhere in the object.
        let escaped_key = records(br#"{"a":{"id":1},"\u0069d":"x"}"#, Format::Jsonl);
        assert_eq!(escaped_key[0].id, "x");
    }

    #[test]
    fn jsonl_custom_id_field() {
        let mut opts = options(Format::Jsonl);
        opts.id_field = "key".into();
        let got = read_with(b"{\"id\":1,\"key\":\"k\"}\n{\"id\":2}", opts);
        assert_eq!(got[0].as_ref().map(|r| r.id.as_str()).ok(), Some("k"));
        let e = got[1].as_ref().expect_err("missing key");
        assert_eq!(e.to_string(), "line 2: field \"key\" is missing");
    }

    #[test]
    fn jsonl_missing_id() {
        let input = format!("{}{{\"name\":\"x\"}}\n", "{\"id\":1}\n".repeat(16));
        assert_eq!(
            jsonl_error(&input),
            (Some(17), "line 17: field \"id\" is missing".into())
        );
    }

    #[test]
    fn jsonl_malformed() {
        assert_eq!(
            jsonl_error("{\"id\":1}\n\n{\"id\":\"ab\" \"x\":1}\n"),
            (
                Some(3),
                "line 3: malformed JSON: expected `,` or `}` at column 12".into()
            )
        );
        // Columns count the line's leading whitespace.
        assert_eq!(
            jsonl_error("  {\"id\":\"ab\" \"x\":1}").1,
            "line 1: malformed JSON: expected `,` or `}` at column 14"
        );
        assert_eq!(
            jsonl_error("{\"id\":1}\n{\"id\":2").1,
            "line 2: malformed JSON: unexpected end of line while parsing an object at column 7"
        );
        assert_eq!(jsonl_error("{\"id\":1} x").0, Some(1));
        assert_eq!(jsonl_error("\nhello").0, Some(2));
        assert_eq!(jsonl_error("{\"id\":1,}").0, Some(1));
        assert_eq!(jsonl_error("{'id':1}").0, Some(1));
        // A raw NUL byte or control character is not valid JSON.
        assert_eq!(jsonl_error("\n\n{\"id\":\"a\0\"}").0, Some(3));
        // A form feed is not JSON whitespace.
        assert_eq!(jsonl_error("\n\x0c").0, Some(2));
    }

    #[test]
    fn jsonl_rejects_non_objects() {
        for (text, found) in [
            ("[1,2]", "an array"),
            ("42", "a number"),
            ("\"s\"", "a string"),
            ("true", "a boolean"),
            ("null", "null"),
        ] {
            let input = format!("{{\"id\":1}}\n{text}\n");
            assert_eq!(
                jsonl_error(&input),
                (
                    Some(2),
                    format!("line 2: expected a JSON object, found {found}")
                )
            );
        }
        // A malformed non-object is reported as malformed.
        assert!(jsonl_error("[1,").1.starts_with("line 1: malformed JSON: "));
    }

    #[test]
    fn jsonl_rejects_bad_id_types() {
        for (value, found) in [
            ("null", "null"),
            ("true", "a boolean"),
            ("false", "a boolean"),
            ("1.5", "a float"),
            ("1e3", "a float"),
            ("[1]", "an array"),
            ("{\"a\":1}", "an object"),
        ] {
            let input = format!("{{\"id\":1}}\n{{\"id\":1}}\n\n{{\"id\":{value}}}\n");
            assert_eq!(
                jsonl_error(&input),
                (
                    Some(4),
                    format!("line 4: id is {found}; the id field must be a string or an integer")
                )
            );
        }
    }

    #[test]
    fn jsonl_rejects_empty_and_duplicate_ids() {
        assert_eq!(
            jsonl_error("{\"id\":\"a\"}\n{\"id\":\"\"}"),
            (Some(2), "line 2: id is empty".into())
        );
        assert_eq!(
            jsonl_error("{\"id\":\"a\"}\n{\"id\":\"a\",\"id\":\"b\"}"),
            (
                Some(2),
                "line 2: field \"id\" appears more than once".into()
            )
        );
    }

    #[test]
    fn jsonl_id_length_limit() {
        let mut opts = options(Format::Jsonl);
        opts.max_id_bytes = 4;
        // "éé" is 4 bytes: at the limit.
        let ok = read_with("{\"id\":\"éé\"}\n{\"id\":1234}".as_bytes(), opts.clone());
        assert!(ok.iter().all(Result::is_ok));
        let e = error_with(b"{\"id\":\"abcd\"}\n{\"id\":\"abcde\"}", opts.clone());
        assert_eq!(e.to_string(), "line 2: id is 5 bytes, over the limit of 4");
        let e = error_with(b"\n{\"id\":12345}", opts);
        assert_eq!(e.line(), Some(2));
        assert!(matches!(e, InputError::IdTooLong { size: 5, .. }));
    }

    #[test]
    fn jsonl_payload_limit() {
        let mut opts = options(Format::Jsonl);
        opts.max_payload_bytes = 20;
        // 20 bytes, then 21 bytes.
        let at_limit = format!("{{\"id\":1,\"p\":\"{}\"}}", "x".repeat(5));
        assert_eq!(at_limit.len(), 20);
        let over = format!("{{\"id\":1,\"p\":\"{}\"}}", "x".repeat(6));
        // Surrounding whitespace does not count.
        let input = format!("  {at_limit} \r\n{at_limit}\n\n{over}\n{at_limit}\n");
        let results = read_with(input.as_bytes(), opts.clone());
        assert_eq!(results.len(), 3);
        assert_eq!(
            results[2].as_ref().map_err(ToString::to_string),
            Err("line 4: payload is 21 bytes, over the limit of 20".to_string())
        );
        // A much longer line is measured without being stored, and reading stops there.
        let huge = format!("{{\"id\":1,\"p\":\"{}\"}}   ", "y".repeat(100_000));
        let input = format!("{at_limit}\n{huge}\r\n{at_limit}\n");
        let e = error_with(input.as_bytes(), opts.clone());
        assert_eq!(
            e.to_string(),
            "line 2: payload is 100015 bytes, over the limit of 20"
        );
        // A small object padded with lots of whitespace is fine.
        let padded = format!("{at_limit}{}\n{at_limit}", " ".repeat(1000));
        let got = read_with(padded.as_bytes(), opts.clone());
        assert_eq!(got.len(), 2);
        assert!(got
            .iter()
            .all(|r| r.as_ref().is_ok_and(|r| r.payload == at_limit)));
        // The default limit is 1 MiB.
        let big = format!("{{\"id\":1,\"p\":\"{}\"}}", "z".repeat(2_000_000 - 15));
        let e = error(format!("\n\n\n\n\n\n\n\n{big}").as_bytes(), Format::Jsonl);
        assert_eq!(
            e.to_string(),
            "line 9: payload is 2000000 bytes, over the limit of 1048576"
        );
    }

    #[test]
    fn jsonl_rejects_what_postgres_cannot_store() {
        // \u0000 in a value, a key or the id.
        for text in [
            r#"{"id":1,"v":"a\u0000b"}"#,
            r#"{"id":1,"a\u0000":1}"#,
            r#"{"id":"\u0000"}"#,
            r#"{"id":1,"v":["\\\u0000"]}"#,
        ] {
            let e = error(format!("{{\"id\":1}}\n\n{text}").as_bytes(), Format::Jsonl);
            assert!(
                matches!(e, InputError::NulCharacter { line: 3, .. }),
                "{text}: {e}"
            );
            assert!(e.to_string().starts_with("line 3: "));
        }
        // An escaped backslash followed by "u0000" is ordinary text.
        let got = records(br#"{"id":"a\\u0000","v":"\\\\u0000"}"#, Format::Jsonl);
        assert_eq!(got[0].id, "a\\u0000");
        // Unpaired surrogates.
        for text in [
            r#"{"id":1,"v":"\ud800"}"#,
            r#"{"id":1,"v":"\uD800x"}"#,
            r#"{"id":1,"v":"\udc00"}"#,
            r#"{"id":1,"v":"\ud800\u0041"}"#,
            r#"{"id":1,"v":"\ude00\ud83d"}"#,
        ] {
            let e = error(format!("\n{text}").as_bytes(), Format::Jsonl);
            assert!(
                matches!(e, InputError::UnpairedSurrogate { line: 2 }),
                "{text}: {e}"
            );
        }
        assert_eq!(
            records(br#"{"id":1,"v":"\ud83d\ude00\uD83D\uDE00"}"#, Format::Jsonl).len(),
            1
        );
    }

    #[test]
    fn jsonl_rejects_invalid_utf8() {
        let e = error(b"{\"id\":1}\n{\"id\":\"a\xff\"}\n", Format::Jsonl);
        assert_eq!(e.to_string(), "line 2: invalid UTF-8 at column 9");
        let e = error(b"\n\n {\"id\":\"\xe6\x97\"}", Format::Jsonl);
        assert_eq!(e.line(), Some(3));
    }

    #[test]
    fn jsonl_empty_inputs() {
        for input in ["", "\n", "  \n\t\n\r\n", "\u{feff}", "   "] {
            let results = read(input.as_bytes(), Format::Jsonl);
            assert_eq!(results.len(), 1, "{input:?}");
            assert!(matches!(results[0], Err(InputError::Empty)));
        }
        assert_eq!(InputError::Empty.to_string(), "input is empty: no records");
        assert_eq!(InputError::Empty.line(), None);
    }

    #[test]
    fn iteration_stops_after_the_first_error() {
        let mut reader = RecordReader::new(
            b"{\"id\":1}\n[]\n{\"id\":2}\n".as_slice(),
            options(Format::Jsonl),
        );
        assert!(reader.next().is_some_and(|r| r.is_ok()));
        assert!(reader.next().is_some_and(|r| r.is_err()));
        assert!(reader.next().is_none());
        assert!(reader.next().is_none());
        assert_eq!(reader.records_read(), 1);
        // No Empty after an error, even with no records.
        assert_eq!(read(b"[]", Format::Jsonl).len(), 1);
    }

    #[test]
    fn io_errors_have_no_line() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        for format in [Format::Jsonl, Format::Csv] {
            let results: Vec<_> =
                RecordReader::new(io::BufReader::new(Failing), options(format)).collect();
            assert_eq!(results.len(), 1);
            let e = results.into_iter().next().and_then(Result::err);
            assert!(matches!(e, Some(InputError::Io(_))), "{format}");
        }
    }

    #[test]
    fn errors_can_name_their_file() {
        let e = error(b"\n\n[]", Format::Jsonl).in_file("data.jsonl");
        assert_eq!(e.line(), Some(3));
        assert_eq!(
            e.to_string(),
            "data.jsonl: line 3: expected a JSON object, found an array"
        );
        let e = InputError::Empty.in_file("-");
        assert_eq!(e.to_string(), "-: input is empty: no records");
        assert_eq!(InputError::Rejected("x: line 2: y".into()).line(), None);
    }

    // --- CSV -------------------------------------------------------------------------------

    #[test]
    fn csv_reads_rows_as_string_objects() {
        let input = "name,id,note\nAda,1,\"hello, \"\"world\"\"\"\nBob,b2,\t\\ é\n";
        let got = records(input.as_bytes(), Format::Csv);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].line, got[0].id.as_str()), (2, "1"));
        assert_eq!(
            serde_json::from_str::<Value>(&got[0].payload).ok(),
            Some(json!({"name": "Ada", "id": "1", "note": "hello, \"world\""}))
        );
        assert_eq!(
            got[0].payload,
            r#"{"name":"Ada","id":"1","note":"hello, \"world\""}"#
        );
        assert_eq!((got[1].line, got[1].id.as_str()), (3, "b2"));
        assert_eq!(
            serde_json::from_str::<Value>(&got[1].payload).ok(),
            Some(json!({"name": "Bob", "id": "b2", "note": "\t\\ é"}))
        );
    }

    #[test]
    fn csv_lines_follow_multiline_fields_blank_lines_and_crlf() {
        let input =
            "\u{feff}\r\n\r\nid,text\r\na,\"one\r\ntwo\r\nthree\"\r\n\r\n\r\nb,x\r\nc,\"\n\"\nd,y";
        let got = records(input.as_bytes(), Format::Csv);
        let lines: Vec<(u64, &str)> = got.iter().map(|r| (r.line, r.id.as_str())).collect();
        assert_eq!(lines, vec![(4, "a"), (9, "b"), (10, "c"), (12, "d")]);
        assert_eq!(
            serde_json::from_str::<Value>(&got[0].payload).ok(),
            Some(json!({"id": "a", "text": "one\r\ntwo\r\nthree"}))
        );
        // Control characters are escaped in the payload.
        let got = records(b"id,v\n1,\"\x01\x1f\"\n", Format::Csv);
        assert_eq!(got[0].payload, r#"{"id":"1","v":"\u0001\u001f"}"#);
    }

    #[test]
    fn csv_missing_id_column() {
        assert_eq!(
            csv_error("a,b,c\n1,2,3\n"),
            (
                Some(1),
                "line 1: CSV header has no column \"id\" (columns: a, b, c)".into()
            )
        );
        // Reported at the header even when no row follows, and at the header's own line.
        assert_eq!(csv_error("\n\nID\n").0, Some(3));
        let many = (0..60)
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(csv_error(&many).1.ends_with(", c49, … (60 in all))"));
    }

    #[test]
    fn csv_duplicate_columns() {
        assert_eq!(
            csv_error("id,a,b,a\n1,2,3,4\n"),
            (
                Some(1),
                "line 1: CSV header has column \"a\" more than once".into()
            )
        );
    }

    #[test]
    fn csv_field_count_mismatch() {
        assert_eq!(
            csv_error("id,a,b,c\n1,2,3,4\n\n2,3,4,5\n3,4,5\n"),
            (
                Some(5),
                "line 5: CSV row has 3 fields, the header has 4".into()
            )
        );
        assert_eq!(csv_error("id,a\r\n1,2\r\n2,3,4\r\n").0, Some(3));
    }

    #[test]
    fn csv_empty_id() {
        assert_eq!(
            csv_error("id,a\n1,x\n\"a\nb\",y\n,z\n"),
            (Some(5), "line 5: id is empty".into())
        );
    }

    #[test]
    fn csv_limits() {
        let mut opts = options(Format::Csv);
        opts.max_payload_bytes = 20;
        opts.max_id_bytes = 3;
        // {"id":"abc","v":"x"} is 20 bytes.
        let e = error_with(b"id,v\nabc,x\nabc,xy\n", opts.clone());
        assert_eq!(
            e.to_string(),
            "line 3: payload is 21 bytes, over the limit of 20"
        );
        let e = error_with(b"id,v\nabc,x\nabcd,\n", opts.clone());
        assert_eq!(e.to_string(), "line 3: id is 4 bytes, over the limit of 3");
        // An unclosed quote stops the read early, at the line where the record starts.
        let input = format!("id,v\nabc,x\nabc,\"{}", "a,b\n".repeat(10_000));
        let e = error_with(input.as_bytes(), opts);
        assert!(
            matches!(e, InputError::CsvRecordTooLarge { line: 3, .. }),
            "{e}"
        );
    }

    #[test]
    fn csv_rejects_nul_and_invalid_utf8() {
        let e = error(b"id,v\n1,a\n2,a\0b\n", Format::Csv);
        assert_eq!(
            e.to_string(),
            "line 3: column \"v\" contains a NUL character (U+0000), which PostgreSQL cannot store"
        );
        let e = error(b"id,v\n1,a\n\n2,\"\xff\"\n", Format::Csv);
        assert_eq!(
            e.to_string(),
            "line 4: invalid UTF-8 in column \"v\" at byte 1"
        );
        assert_eq!(error(b"id,v\xff\n1,2\n", Format::Csv).line(), Some(1));
        assert_eq!(error(b"id,v\0\n1,2\n", Format::Csv).line(), Some(1));
    }

    #[test]
    fn csv_empty_inputs() {
        for input in ["", "\n\n", "\r\n", "id,a\n", "\u{feff}id,a\r\n\r\n"] {
            let results = read(input.as_bytes(), Format::Csv);
            assert_eq!(results.len(), 1, "{input:?}");
            assert!(matches!(results[0], Err(InputError::Empty)), "{input:?}");
        }
    }

    // --- hashing and COPY ------------------------------------------------------------------

    #[test]
    fn hashing_reader_fingerprints_everything_read() {
        fn digest(input: &[u8], format: Format) -> String {
            let hashing = HashingReader::new(input);
            let handle = hashing.digest_handle();
            let reader = RecordReader::new(io::BufReader::new(hashing), options(format));
            assert_eq!(reader.get_ref().get_ref().bytes_read(), 0);
            assert!(reader.count() > 0);
            assert_eq!(handle.bytes(), input.len() as u64);
            handle.hex()
        }
        let a = digest(b"{\"id\":1}\n{\"id\":2}\n", Format::Jsonl);
        assert_eq!(a, digest(b"{\"id\":1}\n{\"id\":2}\n", Format::Jsonl));
        assert_ne!(a, digest(b"{\"id\":1}\n{\"id\":3}\n", Format::Jsonl));
        assert_ne!(a, digest(b"{\"id\":1}\n{\"id\":2}\n\n", Format::Jsonl));
        let c = digest(b"\xEF\xBB\xBFid\n1\n", Format::Csv);
        assert_ne!(c, digest(b"id\n1\n", Format::Csv));
        // Known value: SHA-256("abc").
        let mut hashing = HashingReader::new(b"abc".as_slice());
        io::copy(&mut hashing, &mut io::sink()).expect("copy");
        assert_eq!(
            hashing.digest_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            HashingReader::new(io::empty()).digest_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn copy_rows_escape_special_characters() {
        let mut buf = BytesMut::new();
        encode_copy_text_row(&mut buf, &["7", "plain", "{\"a\":\"b\"}"]);
        encode_copy_text_row(&mut buf, &["tab\there", "nl\nand\r\ncr", "back\\slash\\N"]);
        encode_copy_text_row(&mut buf, &["", "é日😀", ""]);
        encode_copy_text_row(&mut buf, &["\\"]);
        assert_eq!(
            &buf[..],
            "7\tplain\t{\"a\":\"b\"}\n\
             tab\\there\tnl\\nand\\r\\ncr\tback\\\\slash\\\\N\n\
             \té日😀\t\n\
             \\\\\n"
                .as_bytes()
        );
    }

    // --- properties ------------------------------------------------------------------------

    /// Number of lines in an input, counting a last line without a line feed.
    fn line_count(input: &[u8]) -> u64 {
        input.iter().filter(|&&b| b == b'\n').count() as u64 + 1
    }

    /// Reads everything and checks the invariants every input must keep.
    fn check_invariants(input: &[u8], options: ReaderOptions) -> Result<(), TestCaseError> {
        let lines = line_count(input);
        let results = read_with(input, options);
        prop_assert!(!results.is_empty());
        let mut last_line = 0;
        for (i, result) in results.iter().enumerate() {
            match result {
                Ok(record) => {
                    prop_assert!(record.line > last_line && record.line <= lines);
                    last_line = record.line;
                    prop_assert!(!record.id.is_empty());
                    let payload = serde_json::from_str::<Value>(&record.payload);
                    prop_assert!(payload.is_ok_and(|p| p.is_object()));
                    prop_assert!(!record.payload.contains('\0'));
                }
                Err(e) => {
                    prop_assert_eq!(i, results.len() - 1, "an error ends the iteration");
                    match e {
                        InputError::Empty => prop_assert_eq!(i, 0),
                        InputError::Io(_) => prop_assert!(false, "no I/O error expected"),
                        other => {
                            let line = other.line();
                            prop_assert!(
                                line.is_some_and(|l| l >= 1 && l <= lines),
                                "{other} has no line in 1..={lines}"
                            );
                            prop_assert!(other.to_string().starts_with("line "));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn small_limits(format: Format, max_payload: usize) -> ReaderOptions {
        let mut options = options(format);
        options.max_payload_bytes = max_payload;
        options.max_id_bytes = 8;
        options
    }

    /// Lines that are often valid records, sometimes broken in interesting ways.
    fn jsonl_line() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just(" \r".to_string()),
            "[ -~]{0,20}",
            any::<String>(),
            (any::<String>(), any::<i64>()).prop_map(|(s, n)| json!({"id": s, "n": n}).to_string()),
            any::<i64>().prop_map(|n| format!("{{\"id\":{n}}}")),
            "\\{\"id\":(\"[a-z\\\\u0-9]{0,8}\"|[0-9.e-]{1,4}|null|true|\\[\\]|\\{\\})\\}",
            "\\{\"id\":\"x\",\"v\":\"(\\\\u[0-9a-fA-FdD]{4}){1,3}\"\\}",
        ]
    }

    /// Rows that are often valid CSV for the header `id,a,b`, sometimes not.
    fn csv_line() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9]{0,3},[a-z\"]{0,3},[ -~]{0,5}",
            "\"[a-z,\n\"]{0,6}\",x,y",
            "[ -~\r\n\t]{0,12}",
            any::<String>(),
        ]
    }

    /// Hands out at most `step` bytes per read, to split records across buffer refills.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// Records, and errors as (line, message) with both size errors as "too large".
    fn summary(
        results: Vec<Result<InputRecord, InputError>>,
    ) -> Vec<Result<InputRecord, (Option<u64>, String)>> {
        results
            .into_iter()
            .map(|r| {
                r.map_err(|e| {
                    let message = match e {
                        InputError::CsvRecordTooLarge { .. }
                        | InputError::PayloadTooLarge { .. } => "too large".to_string(),
                        ref other => other.to_string(),
                    };
                    (e.line(), message)
                })
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn arbitrary_bytes_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..400),
            max_payload in 0usize..64,
        ) {
            for format in [Format::Jsonl, Format::Csv] {
                check_invariants(&input, options(format))?;
                check_invariants(&input, small_limits(format, max_payload))?;
            }
        }

        #[test]
        fn arbitrary_jsonl_lines_never_panic(
            lines in proptest::collection::vec(jsonl_line(), 0..12),
            crlf in any::<bool>(),
            max_payload in 0usize..80,
        ) {
            let input = lines.join(if crlf { "\r\n" } else { "\n" });
            check_invariants(input.as_bytes(), options(Format::Jsonl))?;
            check_invariants(input.as_bytes(), small_limits(Format::Jsonl, max_payload))?;
        }

        #[test]
        fn arbitrary_csv_lines_never_panic(
            lines in proptest::collection::vec(csv_line(), 0..12),
            crlf in any::<bool>(),
            header in prop_oneof![Just("id,a,b"), Just("a,b"), Just("id,id,b"), Just("")],
            max_payload in 0usize..80,
        ) {
            let newline = if crlf { "\r\n" } else { "\n" };
            let input = format!("{header}{newline}{}", lines.join(newline));
            check_invariants(input.as_bytes(), options(Format::Csv))?;
            check_invariants(input.as_bytes(), small_limits(Format::Csv, max_payload))?;
        }

        #[test]
        fn jsonl_round_trips(
            rows in proptest::collection::vec(
                (
                    prop_oneof![
                        "[^\u{0}]{1,12}".prop_map(Value::String),
                        "[\"';\t\\\\ a-zé日😀]{1,12}".prop_map(Value::String),
                        any::<i64>().prop_map(Value::from),
                    ],
                    any::<String>().prop_map(|s| s.replace('\0', "")),
                    any::<Option<i64>>(),
                    0usize..3,
                    any::<bool>(),
                ),
                1..20,
            ),
        ) {
            let mut input = String::new();
            let mut expected = Vec::new();
            let mut line = 1u64;
            for (id, text, number, blank_lines, pretty_space) in rows {
                for _ in 0..blank_lines {
                    input.push_str(" \n");
                    line += 1;
                }
                let payload = json!({"text": text, "id": id, "n": number, "nested": {"id": [text]}});
                let text = payload.to_string();
                if pretty_space {
                    input.push_str(&format!("\t{text} \r"));
                } else {
                    input.push_str(&text);
                }
                input.push('\n');
                let id = match &id {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                expected.push((line, id, payload, text));
                line += 1;
            }
            let got = records(input.as_bytes(), Format::Jsonl);
            prop_assert_eq!(got.len(), expected.len());
            for (record, (line, id, payload, text)) in got.iter().zip(&expected) {
                prop_assert_eq!(record.line, *line);
                prop_assert_eq!(&record.id, id);
                prop_assert_eq!(&record.payload, text);
                let parsed: Value = serde_json::from_str(&record.payload)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&parsed, payload);
            }
        }

        #[test]
        fn csv_round_trips(
            extra_columns in proptest::collection::hash_set("[^\u{0}\u{feff}]{0,6}", 0..4),
            rows in proptest::collection::vec(
                (
                    prop_oneof!["[^\u{0}]{1,12}", "[\"';,\t\r\n\\\\ a-zé😀]{1,12}"],
                    proptest::collection::vec("[^\u{0}]{0,8}", 4),
                ),
                1..15,
            ),
            crlf in any::<bool>(),
        ) {
            let mut columns: Vec<String> = extra_columns.into_iter().filter(|c| c != "id").collect();
            columns.insert(columns.len() / 2, "id".to_string());
            let id_index = columns.iter().position(|c| c == "id").unwrap_or(0);
            let terminator = if crlf { csv::Terminator::CRLF } else { csv::Terminator::Any(b'\n') };
            let mut writer = csv::WriterBuilder::new()
                .terminator(terminator)
                .quote_style(csv::QuoteStyle::Necessary)
                .from_writer(Vec::new());
            let write = |w: &mut csv::Writer<Vec<u8>>, fields: &[String]| -> Result<usize, TestCaseError> {
                w.write_record(fields).map_err(|e| TestCaseError::fail(e.to_string()))?;
                w.flush().map_err(|e| TestCaseError::fail(e.to_string()))?;
                Ok(w.get_ref().len())
            };
            write(&mut writer, &columns)?;
            let mut expected = Vec::new();
            for (id, values) in rows {
                let fields: Vec<String> = columns
                    .iter()
                    .enumerate()
                    .map(|(i, _)| if i == id_index { id.clone() } else { values[i % 4].clone() })
                    .collect();
                let line = 1 + writer.get_ref().iter().filter(|&&b| b == b'\n').count() as u64;
                write(&mut writer, &fields)?;
                let object: serde_json::Map<String, Value> = columns
                    .iter()
                    .cloned()
                    .zip(fields.into_iter().map(Value::String))
                    .collect();
                expected.push((line, id, Value::Object(object)));
            }
            let input = writer.into_inner().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = records(&input, Format::Csv);
            prop_assert_eq!(got.len(), expected.len());
            for (record, (line, id, payload)) in got.iter().zip(&expected) {
                prop_assert_eq!(record.line, *line);
                prop_assert_eq!(&record.id, id);
                let parsed: Value = serde_json::from_str(&record.payload)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&parsed, payload);
            }
        }

        #[test]
        fn small_reads_change_nothing(
            lines in proptest::collection::vec(prop_oneof![jsonl_line(), csv_line()], 0..12),
            header in prop_oneof![Just("id,a,b\n"), Just("")],
            step in 1usize..9,
            capacity in 1usize..20,
            max_payload in 0usize..80,
        ) {
            let body = format!("{header}{}", lines.join("\n"));
            // A byte order mark is only recognized when the first buffer holds all of it.
            let input = body.trim_start_matches('\u{feff}').as_bytes();
            for format in [Format::Jsonl, Format::Csv] {
                for options in [options(format), small_limits(format, max_payload)] {
                    let whole = summary(read_with(input, options.clone()));
                    let trickle = Trickle { data: input, step };
                    let reader = io::BufReader::with_capacity(capacity, trickle);
                    let pieces = summary(RecordReader::new(reader, options).collect());
                    prop_assert_eq!(whole.len(), pieces.len());
                    for (a, b) in whole.iter().zip(&pieces) {
                        match (a, b) {
                            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                            // Small reads may notice an oversized record before its end.
                            (Err((la, ma)), Err((lb, mb))) => {
                                prop_assert_eq!(la, lb);
                                prop_assert!(ma == mb || mb == "too large", "{} / {}", ma, mb);
                            }
                            _ => prop_assert!(false, "{:?} / {:?}", a, b),
                        }
                    }
                }
            }
        }
    }
}
