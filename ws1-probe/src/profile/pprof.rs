//! The pprof protobuf format (`perftools.profiles.Profile` of github.com/google/pprof
//! `proto/profile.proto`), what `go tool pprof`, Pyroscope, Parca and Grafana read, and what
//! `/debug/pprof/profile` serves.
//!
//! The message is written by hand with a small protobuf writer instead of generated code: the
//! profile uses five message types and only varint and length-delimited fields, which does not
//! justify a code generator and its build-time protoc dependency.

use std::{collections::HashMap, io::Write};

use flate2::{Compression, write::GzEncoder};

use super::{ProfFrame, Profile, ProfileKind, StackSample};

/// Mapping name of kernel frames, as perf and the kernel's own symbol listings spell it.
const KERNEL_MAPPING: &str = "[kernel]";

// Field numbers of profile.proto, by message.
mod field {
    pub mod profile {
        pub const SAMPLE_TYPE: u32 = 1;
        pub const SAMPLE: u32 = 2;
        pub const MAPPING: u32 = 3;
        pub const LOCATION: u32 = 4;
        pub const FUNCTION: u32 = 5;
        pub const STRING_TABLE: u32 = 6;
        pub const TIME_NANOS: u32 = 9;
        pub const DURATION_NANOS: u32 = 10;
        pub const PERIOD_TYPE: u32 = 11;
        pub const PERIOD: u32 = 12;
        pub const DEFAULT_SAMPLE_TYPE: u32 = 14;
    }
    pub mod value_type {
        pub const TYPE: u32 = 1;
        pub const UNIT: u32 = 2;
    }
    pub mod sample {
        pub const LOCATION_ID: u32 = 1;
        pub const VALUE: u32 = 2;
        pub const LABEL: u32 = 3;
    }
    pub mod label {
        pub const KEY: u32 = 1;
        pub const STR: u32 = 2;
        pub const NUM: u32 = 3;
    }
    pub mod mapping {
        pub const ID: u32 = 1;
        pub const FILENAME: u32 = 5;
        pub const HAS_FUNCTIONS: u32 = 7;
    }
    pub mod location {
        pub const ID: u32 = 1;
        pub const MAPPING_ID: u32 = 2;
        pub const LINE: u32 = 4;
    }
    pub mod line {
        pub const FUNCTION_ID: u32 = 1;
        pub const LINE: u32 = 2;
    }
    pub mod function {
        pub const ID: u32 = 1;
        pub const NAME: u32 = 2;
        pub const SYSTEM_NAME: u32 = 3;
        pub const FILENAME: u32 = 4;
    }
}

/// Encodes a profile as an uncompressed pprof protobuf message.
///
/// Each stack becomes one sample with values `[samples, value_ns]`, its locations leaf first,
/// a `service` string label and a `pid` numeric label. Functions, locations and mappings are
/// shared between samples, so a function seen in a thousand stacks is written once.
pub fn encode(profile: &Profile) -> Vec<u8> {
    let tables = Tables::build(profile);
    tables.write(profile)
}

/// Encodes a profile as gzip-compressed pprof, the form `go tool pprof` and HTTP profile
/// endpoints exchange.
pub fn encode_gzip(profile: &Profile) -> std::io::Result<Vec<u8>> {
    let raw = encode(profile);
    let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Compression::default());
    gz.write_all(&raw)?;
    gz.finish()
}

/// The names of a profile's two sample values and of its period: pprof shows values by these
/// names (`-sample_index=cpu`) and converts units it recognizes, such as nanoseconds.
fn value_names(kind: ProfileKind) -> (&'static str, &'static str) {
    match kind {
        ProfileKind::Cpu => ("cpu", "nanoseconds"),
        ProfileKind::OffCpu => ("off_cpu", "nanoseconds"),
    }
}

/// Stacks without samples or time carry nothing pprof could show, so they are left out.
fn kept(stack: &StackSample) -> bool {
    stack.samples != 0 || stack.value_ns != 0
}

/// Protobuf int64 fields hold what our u64 counters hold up to 2^63 - 1, far beyond any real
/// profile; larger values saturate instead of turning negative.
fn int64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Splits `file:line` (or `file:line:column`) into the file and the line, 0 when there is none.
fn split_location(location: &str) -> (&str, i64) {
    let numeric = |s: &str| s.parse::<u32>().ok();
    match location.rsplit_once(':') {
        Some((rest, last)) if !rest.is_empty() => match numeric(last) {
            Some(last) => match rest.rsplit_once(':') {
                Some((file, line)) if !file.is_empty() => match numeric(line) {
                    Some(line) => (file, i64::from(line)),
                    None => (rest, i64::from(last)),
                },
                _ => (rest, i64::from(last)),
            },
            None => (location, 0),
        },
        _ => (location, 0),
    }
}

struct FunctionRow {
    name: i64,
    filename: i64,
}

struct LocationRow {
    mapping_id: u64,
    function_id: u64,
    line: i64,
}

/// The deduplicated tables of a profile: strings, functions, locations and mappings, all
/// borrowing the profile's strings so building them copies no names.
struct Tables<'a> {
    strings: Vec<&'a str>,
    string_ids: HashMap<&'a str, i64>,
    functions: Vec<FunctionRow>,
    function_ids: HashMap<(&'a str, &'a str, &'a str), u64>,
    mappings: Vec<i64>,
    mapping_ids: HashMap<&'a str, u64>,
    locations: Vec<LocationRow>,
    location_ids: HashMap<&'a ProfFrame, u64>,
    /// The location ids of every kept stack, stack after stack, leaf first.
    sample_locations: Vec<u64>,
}

impl<'a> Tables<'a> {
    fn build(profile: &'a Profile) -> Self {
        let mut t = Tables {
            strings: Vec::new(),
            string_ids: HashMap::new(),
            functions: Vec::new(),
            function_ids: HashMap::new(),
            mappings: Vec::new(),
            mapping_ids: HashMap::new(),
            locations: Vec::new(),
            location_ids: HashMap::new(),
            sample_locations: Vec::new(),
        };
        // profile.proto requires string_table[0] to be the empty string.
        t.string("");
        for stack in profile.stacks.iter().filter(|s| kept(s)) {
            // Root first, so mapping 1 is the executable of the first stack's outermost frame:
            // pprof takes the first mapping for the main binary and names it in its reports.
            let start = t.sample_locations.len();
            for frame in stack.frames.iter().rev() {
                let id = t.location(frame);
                t.sample_locations.push(id);
            }
            // pprof's samples list locations leaf first, as the model does.
            t.sample_locations[start..].reverse();
        }
        t
    }

    fn string(&mut self, s: &'a str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s);
        self.string_ids.insert(s, id);
        id
    }

    fn mapping(&mut self, module: &'a str) -> u64 {
        if let Some(&id) = self.mapping_ids.get(module) {
            return id;
        }
        let filename = self.string(module);
        self.mappings.push(filename);
        let id = self.mappings.len() as u64;
        self.mapping_ids.insert(module, id);
        id
    }

    fn location(&mut self, frame: &'a ProfFrame) -> u64 {
        if let Some(&id) = self.location_ids.get(frame) {
            return id;
        }
        let module = if frame.kernel {
            Some(KERNEL_MAPPING)
        } else {
            frame.module.as_deref()
        };
        let (file, line) = frame.location.as_deref().map_or(("", 0), split_location);
        // Functions of the same name in different binaries or files stay apart, as they would in
        // a symbolizer's output.
        let key = (frame.function.as_str(), file, module.unwrap_or(""));
        let function_id = match self.function_ids.get(&key) {
            Some(&id) => id,
            None => {
                let name = self.string(&frame.function);
                let filename = self.string(file);
                self.functions.push(FunctionRow { name, filename });
                let id = self.functions.len() as u64;
                self.function_ids.insert(key, id);
                id
            }
        };
        let mapping_id = module.map_or(0, |m| self.mapping(m));
        self.locations.push(LocationRow {
            mapping_id,
            function_id,
            line,
        });
        let id = self.locations.len() as u64;
        self.location_ids.insert(frame, id);
        id
    }

    fn write(mut self, profile: &'a Profile) -> Vec<u8> {
        use field::*;

        let (value_type, value_unit) = value_names(profile.kind);
        let samples_type = self.string("samples");
        let count_unit = self.string("count");
        let value_type = self.string(value_type);
        let value_unit = self.string(value_unit);
        let service_key = self.string("service");
        let pid_key = self.string("pid");
        for stack in profile.stacks.iter().filter(|s| kept(s)) {
            self.string(&stack.service);
        }
        let period = match profile.kind {
            ProfileKind::Cpu => profile.period_ns(),
            // Each off-CPU value is measured, not sampled.
            ProfileKind::OffCpu => 1,
        };

        let mut w = Writer::default();
        for (ty, unit) in [(samples_type, count_unit), (value_type, value_unit)] {
            w.message(profile::SAMPLE_TYPE, |w| {
                w.int64(value_type::TYPE, ty);
                w.int64(value_type::UNIT, unit);
            });
        }

        let mut next = 0;
        for stack in profile.stacks.iter().filter(|s| kept(s)) {
            let ids = &self.sample_locations[next..next + stack.frames.len()];
            next += stack.frames.len();
            let service = self.string_ids.get(stack.service.as_str()).copied();
            w.message(profile::SAMPLE, |w| {
                w.packed(sample::LOCATION_ID, ids.iter().copied());
                w.packed(
                    sample::VALUE,
                    [int64(stack.samples), int64(stack.value_ns)].map(|v| v as u64),
                );
                w.message(sample::LABEL, |w| {
                    w.int64(label::KEY, service_key);
                    w.int64(label::STR, service.unwrap_or(0));
                });
                w.message(sample::LABEL, |w| {
                    w.int64(label::KEY, pid_key);
                    w.int64(label::NUM, i64::from(stack.pid));
                });
            });
        }

        for (i, &filename) in self.mappings.iter().enumerate() {
            w.message(profile::MAPPING, |w| {
                w.uint64(mapping::ID, i as u64 + 1);
                w.int64(mapping::FILENAME, filename);
                w.bool(mapping::HAS_FUNCTIONS, true);
            });
        }
        for (i, loc) in self.locations.iter().enumerate() {
            w.message(profile::LOCATION, |w| {
                w.uint64(location::ID, i as u64 + 1);
                w.uint64(location::MAPPING_ID, loc.mapping_id);
                w.message(location::LINE, |w| {
                    w.uint64(line::FUNCTION_ID, loc.function_id);
                    w.int64(line::LINE, loc.line);
                });
            });
        }
        for (i, f) in self.functions.iter().enumerate() {
            w.message(profile::FUNCTION, |w| {
                w.uint64(function::ID, i as u64 + 1);
                w.int64(function::NAME, f.name);
                // Names arrive demangled; the demangled name is the best system name there is.
                w.int64(function::SYSTEM_NAME, f.name);
                w.int64(function::FILENAME, f.filename);
            });
        }
        for s in &self.strings {
            w.string(profile::STRING_TABLE, s);
        }

        w.int64(profile::TIME_NANOS, int64(profile.start_unix_ns));
        w.int64(
            profile::DURATION_NANOS,
            i64::try_from(profile.duration.as_nanos()).unwrap_or(i64::MAX),
        );
        w.message(profile::PERIOD_TYPE, |w| {
            w.int64(value_type::TYPE, value_type);
            w.int64(value_type::UNIT, value_unit);
        });
        w.int64(profile::PERIOD, int64(period));
        w.int64(profile::DEFAULT_SAMPLE_TYPE, value_type);
        w.buf
    }
}

/// Wire types of the protobuf encoding this format needs.
#[derive(Clone, Copy)]
enum WireType {
    Varint = 0,
    Len = 2,
}

/// A protobuf writer for the subset of the encoding pprof uses.
///
/// Scalar fields equal to their default (zero, false) are omitted as proto3 encoders do. A nested
/// message is written in place and its length inserted in front of it afterwards, which moves only
/// that message's bytes and needs no scratch buffer per message.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.buf.push((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        self.buf.push(value as u8);
    }

    fn key(&mut self, field: u32, wire: WireType) {
        self.varint(u64::from(field) << 3 | wire as u64);
    }

    fn uint64(&mut self, field: u32, value: u64) {
        if value != 0 {
            self.key(field, WireType::Varint);
            self.varint(value);
        }
    }

    /// int64 is encoded as the two's complement u64, so negative values take ten bytes.
    fn int64(&mut self, field: u32, value: i64) {
        self.uint64(field, value as u64);
    }

    fn bool(&mut self, field: u32, value: bool) {
        self.uint64(field, u64::from(value));
    }

    /// Written even when empty: string_table[0] must be present and be "".
    fn string(&mut self, field: u32, value: &str) {
        self.key(field, WireType::Len);
        self.varint(value.len() as u64);
        self.buf.extend_from_slice(value.as_bytes());
    }

    /// A packed repeated varint field (the proto3 encoding of repeated numbers).
    fn packed(&mut self, field: u32, values: impl IntoIterator<Item = u64>) {
        self.message(field, |w| {
            for v in values {
                w.varint(v);
            }
        });
    }

    fn message(&mut self, field: u32, body: impl FnOnce(&mut Self)) {
        self.key(field, WireType::Len);
        let start = self.buf.len();
        body(self);
        let len = (self.buf.len() - start) as u64;
        let mut prefix = [0u8; 10];
        let mut n = 0;
        let mut rest = len;
        while rest >= 0x80 {
            prefix[n] = (rest as u8 & 0x7f) | 0x80;
            rest >>= 7;
            n += 1;
        }
        prefix[n] = rest as u8;
        n += 1;
        self.buf.splice(start..start, prefix[..n].iter().copied());
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Read, time::Duration};

    use super::*;

    // An independent reading of profile.proto: prost's derive implements the wire format, so these
    // tests check our hand-written encoder against a decoder we did not write.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PbProfile {
        #[prost(message, repeated, tag = "1")]
        sample_type: Vec<PbValueType>,
        #[prost(message, repeated, tag = "2")]
        sample: Vec<PbSample>,
        #[prost(message, repeated, tag = "3")]
        mapping: Vec<PbMapping>,
        #[prost(message, repeated, tag = "4")]
        location: Vec<PbLocation>,
        #[prost(message, repeated, tag = "5")]
        function: Vec<PbFunction>,
        #[prost(string, repeated, tag = "6")]
        string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        time_nanos: i64,
        #[prost(int64, tag = "10")]
        duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        period_type: Option<PbValueType>,
        #[prost(int64, tag = "12")]
        period: i64,
        #[prost(int64, tag = "14")]
        default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct PbValueType {
        #[prost(int64, tag = "1")]
        r#type: i64,
        #[prost(int64, tag = "2")]
        unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct PbSample {
        #[prost(uint64, repeated, tag = "1")]
        location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        label: Vec<PbLabel>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct PbLabel {
        #[prost(int64, tag = "1")]
        key: i64,
        #[prost(int64, tag = "2")]
        str: i64,
        #[prost(int64, tag = "3")]
        num: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct PbMapping {
        #[prost(uint64, tag = "1")]
        id: u64,
        #[prost(int64, tag = "5")]
        filename: i64,
        #[prost(bool, tag = "7")]
        has_functions: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct PbLocation {
        #[prost(uint64, tag = "1")]
        id: u64,
        #[prost(uint64, tag = "2")]
        mapping_id: u64,
        #[prost(message, repeated, tag = "4")]
        line: Vec<PbLine>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct PbLine {
        #[prost(uint64, tag = "1")]
        function_id: u64,
        #[prost(int64, tag = "2")]
        line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct PbFunction {
        #[prost(uint64, tag = "1")]
        id: u64,
        #[prost(int64, tag = "2")]
        name: i64,
        #[prost(int64, tag = "3")]
        system_name: i64,
        #[prost(int64, tag = "4")]
        filename: i64,
    }

    fn decode(bytes: &[u8]) -> PbProfile {
        <PbProfile as prost::Message>::decode(bytes).unwrap()
    }

    impl PbProfile {
        fn s(&self, id: i64) -> &str {
            &self.string_table[usize::try_from(id).unwrap()]
        }

        fn value_type(&self, vt: &PbValueType) -> (&str, &str) {
            (self.s(vt.r#type), self.s(vt.unit))
        }

        fn location(&self, id: u64) -> &PbLocation {
            let loc = &self.location[(id - 1) as usize];
            assert_eq!(loc.id, id);
            loc
        }

        fn function(&self, id: u64) -> &PbFunction {
            let f = &self.function[(id - 1) as usize];
            assert_eq!(f.id, id);
            f
        }

        fn mapping_name(&self, id: u64) -> &str {
            let m = &self.mapping[(id - 1) as usize];
            assert_eq!(m.id, id);
            assert!(m.has_functions);
            self.s(m.filename)
        }

        /// Function names of a sample, leaf first.
        fn names(&self, sample: &PbSample) -> Vec<&str> {
            sample
                .location_id
                .iter()
                .map(|&id| {
                    let loc = self.location(id);
                    assert_eq!(loc.line.len(), 1);
                    self.s(self.function(loc.line[0].function_id).name)
                })
                .collect()
        }

        fn labels(&self, sample: &PbSample) -> Vec<(String, String)> {
            sample
                .label
                .iter()
                .map(|l| {
                    let value = if l.str != 0 {
                        self.s(l.str).to_owned()
                    } else {
                        format!("#{}", l.num)
                    };
                    (self.s(l.key).to_owned(), value)
                })
                .collect()
        }
    }

    fn frame(name: &str, module: Option<&str>, location: Option<&str>, kernel: bool) -> ProfFrame {
        ProfFrame {
            function: name.to_owned(),
            module: module.map(str::to_owned),
            location: location.map(str::to_owned),
            kernel,
        }
    }

    fn stack(
        service: &str,
        pid: u32,
        frames: Vec<ProfFrame>,
        samples: u64,
        ns: u64,
    ) -> StackSample {
        StackSample {
            service: service.to_owned(),
            pid,
            frames,
            samples,
            value_ns: ns,
            truncated: false,
        }
    }

    fn cpu_profile() -> Profile {
        let main = frame("main", Some("/usr/bin/api"), Some("src/main.rs:10"), false);
        let work = frame("work", Some("/usr/bin/api"), Some("src/work.rs:42"), false);
        let work_other_line = frame(
            "work",
            Some("/usr/bin/api"),
            Some("src/work.rs:50:7"),
            false,
        );
        let write = frame("write", Some("/usr/lib/libc.so.6"), None, false);
        let ksys = frame("ksys_write", Some("[kernel]"), None, true);
        let mut p = Profile::new(ProfileKind::Cpu, 100, 1_700_000_000_123_456_789);
        p.duration = Duration::from_secs(10);
        p.stacks = vec![
            stack(
                "api",
                41,
                vec![ksys.clone(), write.clone(), work.clone(), main.clone()],
                7,
                70_000_000,
            ),
            stack("api", 41, vec![work.clone(), main.clone()], 3, 30_000_000),
            stack(
                "worker",
                99,
                vec![work_other_line, main.clone()],
                2,
                20_000_000,
            ),
            stack("worker", 99, vec![main.clone()], 0, 0),
            stack("worker", 99, vec![write], 1, 10_000_000),
        ];
        p
    }

    #[test]
    fn cpu_profile_decodes_with_an_independent_decoder() {
        let p = cpu_profile();
        let d = decode(&encode(&p));

        assert_eq!(d.string_table[0], "");
        let mut unique = d.string_table.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), d.string_table.len(), "duplicate strings");

        let types: Vec<_> = d.sample_type.iter().map(|vt| d.value_type(vt)).collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        assert_eq!(
            d.value_type(d.period_type.as_ref().unwrap()),
            ("cpu", "nanoseconds")
        );
        assert_eq!(d.period, 10_000_000);
        assert_eq!(d.s(d.default_sample_type), "cpu");
        assert_eq!(d.time_nanos, 1_700_000_000_123_456_789);
        assert_eq!(d.duration_nanos, 10_000_000_000);

        // The zero stack is dropped; the others keep their order, values and labels.
        assert_eq!(d.sample.len(), 4);
        let totals = d.sample.iter().fold([0i64; 2], |acc, s| {
            assert_eq!(s.value.len(), 2);
            [acc[0] + s.value[0], acc[1] + s.value[1]]
        });
        assert_eq!(totals, [13, 130_000_000]);
        assert_eq!(d.sample[0].value, [7, 70_000_000]);
        assert_eq!(
            d.names(&d.sample[0]),
            ["ksys_write", "write", "work", "main"]
        );
        assert_eq!(d.names(&d.sample[1]), ["work", "main"]);
        assert_eq!(d.names(&d.sample[2]), ["work", "main"]);
        assert_eq!(d.names(&d.sample[3]), ["write"]);
        assert_eq!(
            d.labels(&d.sample[0]),
            [
                ("service".to_owned(), "api".to_owned()),
                ("pid".to_owned(), "#41".to_owned())
            ]
        );
        assert_eq!(
            d.labels(&d.sample[2]),
            [
                ("service".to_owned(), "worker".to_owned()),
                ("pid".to_owned(), "#99".to_owned())
            ]
        );

        // Locations are per frame (two lines of `work` are two locations), functions per
        // (name, file, module), mappings per module.
        assert_eq!(d.location.len(), 5);
        assert_eq!(d.function.len(), 4);
        assert_eq!(d.mapping.len(), 3);
        assert_eq!(d.sample[0].location_id[2], d.sample[1].location_id[0]);
        assert_ne!(d.sample[1].location_id[0], d.sample[2].location_id[0]);
        assert_eq!(d.sample[0].location_id[3], d.sample[2].location_id[1]);

        // The first mapping is the executable (the outermost frame's module), not the kernel.
        assert_eq!(d.mapping_name(1), "/usr/bin/api");
        let ksys = d.location(d.sample[0].location_id[0]);
        assert_eq!(d.mapping_name(ksys.mapping_id), "[kernel]");
        assert_eq!(ksys.line[0].line, 0);
        let write = d.location(d.sample[0].location_id[1]);
        assert_eq!(d.mapping_name(write.mapping_id), "/usr/lib/libc.so.6");
        let work = d.location(d.sample[1].location_id[0]);
        assert_eq!(d.mapping_name(work.mapping_id), "/usr/bin/api");
        assert_eq!(work.line[0].line, 42);
        let work_fn = d.function(work.line[0].function_id);
        assert_eq!(d.s(work_fn.filename), "src/work.rs");
        assert_eq!(d.s(work_fn.system_name), "work");
        let work_col = d.location(d.sample[2].location_id[0]);
        assert_eq!(work_col.line[0].line, 50);
        assert_eq!(work_col.line[0].function_id, work.line[0].function_id);
        let write_fn = d.function(write.line[0].function_id);
        assert_eq!(write_fn.filename, 0);
    }

    #[test]
    fn off_cpu_profile_names_its_values_off_cpu() {
        let mut p = Profile::new(ProfileKind::OffCpu, 0, 5);
        p.duration = Duration::from_millis(1500);
        p.stacks = vec![
            stack(
                "db",
                3,
                vec![frame("futex_wait", None, None, true)],
                2,
                4_000,
            ),
            stack("db", 3, vec![frame("poll", None, None, false)], 1, 250),
        ];
        let d = decode(&encode(&p));
        let types: Vec<_> = d.sample_type.iter().map(|vt| d.value_type(vt)).collect();
        assert_eq!(types, [("samples", "count"), ("off_cpu", "nanoseconds")]);
        assert_eq!(
            d.value_type(d.period_type.as_ref().unwrap()),
            ("off_cpu", "nanoseconds")
        );
        assert_eq!(d.period, 1);
        assert_eq!(d.s(d.default_sample_type), "off_cpu");
        assert_eq!(d.time_nanos, 5);
        assert_eq!(d.duration_nanos, 1_500_000_000);
        assert_eq!(d.sample[0].value, [2, 4_000]);
        assert_eq!(d.sample[1].value, [1, 250]);
        // Kernel frames get the kernel mapping even without a module; other frames without a
        // module have none.
        let kernel = d.location(d.sample[0].location_id[0]);
        assert_eq!(d.mapping_name(kernel.mapping_id), "[kernel]");
        assert_eq!(d.location(d.sample[1].location_id[0]).mapping_id, 0);
        assert_eq!(d.mapping.len(), 1);
    }

    #[test]
    fn empty_profile_is_a_valid_message() {
        let p = Profile::new(ProfileKind::Cpu, 99, 0);
        let d = decode(&encode(&p));
        assert!(d.sample.is_empty());
        assert!(d.location.is_empty());
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.sample_type.len(), 2);
        assert_eq!(d.period, 10_101_010);
    }

    #[test]
    fn gzip_output_inflates_to_the_plain_encoding() {
        let p = cpu_profile();
        let gz = encode_gzip(&p).unwrap();
        assert_eq!(&gz[..2], [0x1f, 0x8b]);
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw, encode(&p));
    }

    #[test]
    fn writer_encodes_varints_and_long_messages() {
        let mut w = Writer::default();
        w.uint64(1, 300);
        w.int64(2, -1);
        w.uint64(3, 0);
        assert_eq!(
            w.buf,
            [
                0x08, 0xac, 0x02, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]
        );
        // A body of 200 bytes needs a two-byte length in front of it.
        let mut w = Writer::default();
        w.message(5, |w| w.buf.extend_from_slice(&[7u8; 200]));
        assert_eq!(&w.buf[..3], [0x2a, 0xc8, 0x01]);
        assert_eq!(w.buf.len(), 203);
        assert!(w.buf[3..].iter().all(|&b| b == 7));
    }

    #[test]
    fn locations_split_into_file_and_line() {
        assert_eq!(split_location("src/main.rs:10"), ("src/main.rs", 10));
        assert_eq!(split_location("src/main.rs:10:5"), ("src/main.rs", 10));
        assert_eq!(split_location("src/main.rs"), ("src/main.rs", 0));
        assert_eq!(split_location("C:odd"), ("C:odd", 0));
        assert_eq!(split_location(":12"), (":12", 0));
        assert_eq!(int64(u64::MAX), i64::MAX);
    }
}
