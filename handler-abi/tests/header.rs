//! Checks `include/worker_host.h` against its Rust mirror, `handler_abi::ffi`, with the system C
//! and C++ compilers: every size, alignment, offset and constant must agree, and the header must
//! compile cleanly as strict C11 and C++17.
//!
//! The compilers come from `CC` (default `cc`) and `CXX` (default `c++`); a value may carry extra
//! arguments after the program, separated by spaces.

use handler_abi::ffi;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::mem::{align_of, offset_of, size_of, size_of_val};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The size, alignment and field layout of one `#[repr(C)]` struct, as Rust lays it out.
struct StructLayout {
    name: &'static str,
    size: usize,
    align: usize,
    fields: Vec<FieldLayout>,
}

/// One field of a [`StructLayout`].
struct FieldLayout {
    name: &'static str,
    offset: usize,
    size: usize,
}

/// The size of the field that `_field` projects to, without needing a value of the struct.
fn field_size<S, F>(_field: fn(&S) -> &F) -> usize {
    size_of::<F>()
}

/// Builds the [`StructLayout`] of `ffi::$ty` from a list of its fields. The list must name every
/// field of the Rust struct, in declaration order: an exhaustive pattern (no `..`) makes a missing
/// or misspelt field a compile error, and the test checks the order against the header.
macro_rules! struct_layout {
    ($ty:ident { $($field:ident),+ $(,)? }) => {{
        fn names_every_field(value: &ffi::$ty) {
            let ffi::$ty { $($field: _),+ } = value;
        }
        let _: fn(&ffi::$ty) = names_every_field;
        StructLayout {
            name: stringify!($ty),
            size: size_of::<ffi::$ty>(),
            align: align_of::<ffi::$ty>(),
            fields: vec![$(FieldLayout {
                name: stringify!($field),
                offset: offset_of!(ffi::$ty, $field),
                size: field_size(|value: &ffi::$ty| &value.$field),
            }),+],
        }
    }};
}

/// The three structs that cross the boundary, as the Rust mirror lays them out.
fn rust_structs() -> Vec<StructLayout> {
    vec![
        struct_layout!(wh_host_api {
            struct_size,
            abi_major,
            abi_minor,
            log,
            set_output,
            set_error,
            emit,
            progress,
            is_cancelled,
            request_recycle,
            set_error_traceback,
            set_features,
        }),
        struct_layout!(wh_job {
            struct_size,
            id,
            id_len,
            input_json,
            input_json_len,
            job_json,
            job_json_len,
        }),
        struct_layout!(wh_handler_descriptor {
            struct_size,
            abi_major,
            abi_minor,
            name,
            version,
            max_concurrency,
            reserved0,
            features,
            init,
            handle,
            teardown,
        }),
    ]
}

/// A `#define`d integer constant of the header and its value in `ffi`.
struct Constant {
    name: &'static str,
    value: i128,
    /// Whether the Rust type is signed, so the C program prints it with the matching format.
    signed: bool,
    /// The size of the constant's type, for constants the header gives a fixed-width type
    /// (`wh_status`, `wh_log_level`, `uint64_t`); `None` for plain `int` literals.
    typed_size: Option<usize>,
}

/// Whether an integer type is signed.
trait Signedness {
    const SIGNED: bool;
}

macro_rules! signedness {
    ($($ty:ty: $signed:expr),+) => { $(impl Signedness for $ty { const SIGNED: bool = $signed; })+ };
}
signedness!(i8: true, i16: true, i32: true, i64: true, u8: false, u16: false, u32: false, u64: false);

/// Whether `_value`'s type is signed.
fn is_signed<T: Signedness>(_value: T) -> bool {
    T::SIGNED
}

macro_rules! constants {
    ($($name:ident $(: $typed:tt)?),+ $(,)?) => {
        vec![$(Constant {
            name: stringify!($name),
            value: i128::from(ffi::$name),
            signed: is_signed(ffi::$name),
            typed_size: constants!(@size $name $($typed)?),
        }),+]
    };
    (@size $name:ident) => { None };
    (@size $name:ident typed) => { Some(size_of_val(&ffi::$name)) };
}

/// Every integer constant of the header, as `ffi` defines it.
fn rust_constants() -> Vec<Constant> {
    constants![
        WH_ABI_MAJOR,
        WH_ABI_MINOR,
        WH_FEATURE_STREAMING: typed,
        WH_STATUS_OK: typed,
        WH_STATUS_ERROR: typed,
        WH_STATUS_INVALID_ARGUMENT: typed,
        WH_STATUS_INVALID_STATE: typed,
        WH_STATUS_TOO_LARGE: typed,
        WH_STATUS_CANCELLED: typed,
        WH_LOG_TRACE: typed,
        WH_LOG_DEBUG: typed,
        WH_LOG_INFO: typed,
        WH_LOG_WARN: typed,
        WH_LOG_ERROR: typed,
    ]
}

/// `ffi::WH_ENTRY_SYMBOL` without its trailing NUL, checking that it has exactly one, at the end.
fn rust_entry_symbol() -> &'static str {
    let bytes = ffi::WH_ENTRY_SYMBOL
        .strip_suffix(b"\0")
        .expect("ffi::WH_ENTRY_SYMBOL must end with a NUL for dlsym");
    assert!(
        !bytes.contains(&0),
        "ffi::WH_ENTRY_SYMBOL has a NUL before its end"
    );
    std::str::from_utf8(bytes).expect("ffi::WH_ENTRY_SYMBOL is not UTF-8")
}

/// Every item the C program prints, with the value the Rust side expects, keyed by item name.
fn rust_expectations() -> BTreeMap<String, String> {
    let mut expected = BTreeMap::new();
    let mut put = |name: String, value: String| {
        assert!(
            expected.insert(name.clone(), value).is_none(),
            "item {name} listed twice"
        );
    };
    for layout in rust_structs() {
        let ty = layout.name;
        put(format!("sizeof({ty})"), layout.size.to_string());
        put(format!("alignof({ty})"), layout.align.to_string());
        for field in &layout.fields {
            let f = field.name;
            put(format!("offsetof({ty}.{f})"), field.offset.to_string());
            put(format!("sizeof({ty}.{f})"), field.size.to_string());
        }
    }
    for constant in rust_constants() {
        put(constant.name.to_string(), constant.value.to_string());
        if let Some(size) = constant.typed_size {
            put(format!("sizeof({})", constant.name), size.to_string());
        }
    }
    put(
        "sizeof(wh_status)".into(),
        size_of::<ffi::wh_status>().to_string(),
    );
    put(
        "signed(wh_status)".into(),
        u8::from(ffi::wh_status::MIN < 0).to_string(),
    );
    put(
        "sizeof(wh_log_level)".into(),
        size_of::<ffi::wh_log_level>().to_string(),
    );
    put(
        "signed(wh_log_level)".into(),
        u8::from(ffi::wh_log_level::MIN < 0).to_string(),
    );
    put("sizeof(bool)".into(), size_of::<bool>().to_string());
    put("WH_ENTRY_SYMBOL".into(), rust_entry_symbol().to_string());
    expected
}

/// A C program that prints, one per line, `name value` for every item of [`rust_expectations`].
fn layout_program() -> String {
    let mut c = String::from(
        "#include <stdio.h>\n\
         #include <worker_host.h>\n\
         \n\
         #define SIZE(name, expr) printf(\"%s %zu\\n\", name, (size_t)sizeof(expr))\n\
         #define ALIGN(name, type) printf(\"%s %zu\\n\", name, (size_t)_Alignof(type))\n\
         #define OFFSET(name, type, field) printf(\"%s %zu\\n\", name, (size_t)offsetof(type, field))\n\
         #define SIGNED_VALUE(name, expr) printf(\"%s %lld\\n\", name, (long long)(expr))\n\
         #define UNSIGNED_VALUE(name, expr) printf(\"%s %llu\\n\", name, (unsigned long long)(expr))\n\
         \n\
         int main(void) {\n",
    );
    for layout in rust_structs() {
        let ty = layout.name;
        writeln!(c, "    SIZE(\"sizeof({ty})\", {ty});").unwrap();
        writeln!(c, "    ALIGN(\"alignof({ty})\", {ty});").unwrap();
        for field in &layout.fields {
            let f = field.name;
            writeln!(c, "    OFFSET(\"offsetof({ty}.{f})\", {ty}, {f});").unwrap();
            writeln!(c, "    SIZE(\"sizeof({ty}.{f})\", (({ty} *)0)->{f});").unwrap();
        }
    }
    for constant in rust_constants() {
        let name = constant.name;
        let print = if constant.signed {
            "SIGNED_VALUE"
        } else {
            "UNSIGNED_VALUE"
        };
        writeln!(c, "    {print}(\"{name}\", {name});").unwrap();
        if constant.typed_size.is_some() {
            writeln!(c, "    SIZE(\"sizeof({name})\", {name});").unwrap();
        }
    }
    for ty in ["wh_status", "wh_log_level"] {
        writeln!(c, "    SIZE(\"sizeof({ty})\", {ty});").unwrap();
        writeln!(c, "    SIGNED_VALUE(\"signed({ty})\", ({ty})-1 < 0);").unwrap();
    }
    c.push_str(
        "    SIZE(\"sizeof(bool)\", bool);\n\
         \x20   printf(\"WH_ENTRY_SYMBOL %s\\n\", WH_ENTRY_SYMBOL);\n\
         \x20   return 0;\n\
         }\n",
    );
    c
}

/// The folder that holds `worker_host.h`, for `-I`.
fn include_dir() -> &'static Path {
    Path::new(handler_abi::HEADER_PATH)
        .parent()
        .expect("HEADER_PATH has a parent folder")
}

/// The compiler named by the environment variable `var`, or `default`, as a ready `Command`.
fn compiler(var: &str, default: &str) -> Command {
    let spec = std::env::var(var)
        .ok()
        .filter(|value| !value.trim().is_empty())
        .unwrap_or_else(|| default.to_string());
    let mut words = spec.split_whitespace();
    let mut command = Command::new(words.next().expect("compiler name is not empty"));
    command.args(words);
    command
}

/// Runs `command` and returns its stdout, failing the test with the command and its stderr if it
/// cannot start or does not succeed.
fn run(mut command: Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {command:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout),
    );
    String::from_utf8(output.stdout).unwrap_or_else(|e| panic!("{what}: output is not UTF-8: {e}"))
}

/// Writes `source` to `dir/file_name` and returns its path.
fn write_source(dir: &Path, file_name: &str, source: &str) -> PathBuf {
    let path = dir.join(file_name);
    std::fs::write(&path, source).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// The header's text with `/* */` and `//` comments blanked out.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            let end = after.find("*/").expect("unterminated /* comment in header");
            out.push(' ');
            rest = &after[end + 2..];
        } else if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |end| &after[end..]);
        } else {
            let ch = rest.chars().next().expect("rest is not empty");
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
    }
    out
}

/// The field names of `typedef struct <name> { ... } <name>;` in the header, in order: the
/// identifier in `(*name)` for a function pointer, else the last identifier of the declaration.
fn header_fields(header: &str, name: &str) -> Vec<String> {
    let open = format!("typedef struct {name} {{");
    let start = header
        .find(&open)
        .unwrap_or_else(|| panic!("header has no `{open}`"))
        + open.len();
    let close = format!("}} {name};");
    let end = start
        + header[start..]
            .find(&close)
            .unwrap_or_else(|| panic!("header has no `{close}` after `{open}`"));
    header[start..end]
        .split(';')
        .map(str::trim)
        .filter(|declaration| !declaration.is_empty())
        .map(|declaration| {
            let name_part = match declaration.find("(*") {
                Some(at) => {
                    let after = &declaration[at + 2..];
                    &after[..after.find(')').expect("`(*name)` is closed")]
                }
                None => declaration,
            };
            name_part
                .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .find(|word| !word.is_empty())
                .unwrap_or_else(|| panic!("no field name in `{declaration}`"))
                .to_string()
        })
        .collect()
}

/// Checks that the Rust field lists name the header's fields, in the header's order, and that
/// the constant list names every `WH_*` macro of the header, so the C program below covers
/// everything the header declares.
fn assert_field_lists_match_header() {
    let header_text = std::fs::read_to_string(handler_abi::HEADER_PATH)
        .unwrap_or_else(|e| panic!("read {}: {e}", handler_abi::HEADER_PATH));
    let header = strip_comments(&header_text);
    for layout in rust_structs() {
        let in_header = header_fields(&header, layout.name);
        let in_rust: Vec<&str> = layout.fields.iter().map(|f| f.name).collect();
        assert_eq!(
            in_header, in_rust,
            "the fields of {} differ between worker_host.h (left) and ffi.rs (right)",
            layout.name
        );
    }

    let mut defined: Vec<&str> = header
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("#define "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|name| name.starts_with("WH_"))
        .collect();
    let mut checked: Vec<&str> = rust_constants().iter().map(|c| c.name).collect();
    checked.push("WH_ENTRY_SYMBOL");
    defined.sort_unstable();
    checked.sort_unstable();
    assert_eq!(
        defined, checked,
        "the WH_* macros of worker_host.h (left) differ from those this test checks (right)"
    );
}

/// Every size, alignment and field offset of `wh_host_api`, `wh_job` and `wh_handler_descriptor`,
/// every `WH_*` constant and `WH_ENTRY_SYMBOL` agree between the C compiler's view of
/// `worker_host.h` and the Rust mirror in `ffi`.
#[test]
fn layout_matches_the_header() {
    assert_field_lists_match_header();

    let dir = tempfile::tempdir().expect("create a temp dir");
    let source = write_source(dir.path(), "layout.c", &layout_program());
    let binary = dir.path().join("layout");
    let mut compile = compiler("CC", "cc");
    compile
        .args(["-std=c11", "-Wall", "-Wextra", "-I"])
        .arg(include_dir())
        .arg(&source)
        .arg("-o")
        .arg(&binary);
    run(compile, "compiling the layout program");
    let printed = run(Command::new(&binary), "running the layout program");

    let mut from_c = BTreeMap::new();
    for line in printed.lines() {
        let (name, value) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("unexpected line from the layout program: {line:?}"));
        assert!(
            from_c.insert(name.to_string(), value.to_string()).is_none(),
            "the layout program printed {name} twice"
        );
    }

    let expected = rust_expectations();
    let mut problems = Vec::new();
    for (name, rust_value) in &expected {
        match from_c.get(name) {
            Some(c_value) if c_value == rust_value => {}
            Some(c_value) => {
                problems.push(format!("{name}: C says {c_value}, Rust says {rust_value}"));
            }
            None => problems.push(format!("{name}: not printed by the C program")),
        }
    }
    for name in from_c.keys().filter(|name| !expected.contains_key(*name)) {
        problems.push(format!("{name}: printed by the C program but not checked"));
    }
    assert!(
        problems.is_empty(),
        "worker_host.h and ffi.rs disagree on {} item(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// Compile-time assertions of the Rust layout and constants, in the syntax of `keyword`
/// (`_Static_assert` for C11, `static_assert` for C++17), so each compile test also proves that
/// compiler sees the same layout as Rust.
fn static_assertions(keyword: &str) -> String {
    let mut out = String::new();
    for layout in rust_structs() {
        let ty = layout.name;
        let size = layout.size;
        writeln!(out, "{keyword}(sizeof({ty}) == {size}, \"sizeof({ty})\");").unwrap();
        for field in &layout.fields {
            let (f, offset) = (field.name, field.offset);
            writeln!(
                out,
                "{keyword}(offsetof({ty}, {f}) == {offset}, \"offsetof({ty}.{f})\");"
            )
            .unwrap();
        }
    }
    for constant in rust_constants() {
        let (name, value) = (constant.name, constant.value);
        writeln!(out, "{keyword}({name} == {value}, \"{name}\");").unwrap();
    }
    out
}

/// A C11 handler: a static descriptor (designated initializers) and `wh_handler_entry`, with
/// functions that call every host callback.
fn c_unit() -> String {
    format!(
        r#"#include <worker_host.h>

{asserts}
static wh_status demo_init(wh_call *call, const wh_host_api *host, const char *config_json,
                           size_t config_json_len) {{
    host->log(call, WH_LOG_INFO, config_json, config_json_len);
    host->log(call, WH_LOG_DEBUG, WH_ENTRY_SYMBOL, sizeof(WH_ENTRY_SYMBOL) - 1);
    if (host->abi_minor >= 1) {{
        return host->set_features(call, 2, WH_FEATURE_STREAMING);
    }}
    return WH_STATUS_OK;
}}

static wh_status demo_handle(wh_call *call, const wh_host_api *host, const wh_job *job) {{
    wh_status status;
    if (host->struct_size < sizeof(wh_host_api) || host->abi_major != WH_ABI_MAJOR) {{
        return WH_STATUS_ERROR;
    }}
    if (job->id == NULL || job->job_json_len == 0) {{
        if (host->abi_minor >= 1) {{
            host->set_error_traceback(call, "at demo_handle", 14);
        }}
        return host->set_error(call, "BadJob", 6, NULL, 0);
    }}
    if (host->is_cancelled(call)) {{
        return WH_STATUS_CANCELLED;
    }}
    status = host->progress(call, "{{\"percent\": 50}}", 16);
    if (status != WH_STATUS_OK) {{
        return status;
    }}
    status = host->emit(call, job->input_json, job->input_json_len);
    if (status != WH_STATUS_OK) {{
        return status;
    }}
    return host->set_output(call, job->input_json, job->input_json_len);
}}

static void demo_teardown(wh_call *call, const wh_host_api *host) {{
    host->request_recycle(call);
}}

static const wh_handler_descriptor DESCRIPTOR = {{
    .struct_size = sizeof(wh_handler_descriptor),
    .abi_major = WH_ABI_MAJOR,
    .abi_minor = WH_ABI_MINOR,
    .name = "demo",
    .version = "1.0.0",
    .max_concurrency = 1,
    .reserved0 = 0,
    .features = WH_FEATURE_STREAMING,
    .init = demo_init,
    .handle = demo_handle,
    .teardown = demo_teardown,
}};

const wh_handler_descriptor *wh_handler_entry(void) {{
    wh_handler_entry_fn self_check = wh_handler_entry;
    (void)self_check;
    return &DESCRIPTOR;
}}
"#,
        asserts = static_assertions("_Static_assert"),
    )
}

/// The same handler in C++17: aggregate initialization in declaration order (designated
/// initializers are C++20), an anonymous namespace, `nullptr`.
fn cpp_unit() -> String {
    format!(
        r#"#include <worker_host.h>

#include <cstddef>

{asserts}
namespace {{

wh_status demo_init(wh_call *call, const wh_host_api *host, const char *config_json,
                    size_t config_json_len) {{
    host->log(call, WH_LOG_INFO, config_json, config_json_len);
    host->log(call, WH_LOG_DEBUG, WH_ENTRY_SYMBOL, sizeof(WH_ENTRY_SYMBOL) - 1);
    if (host->abi_minor >= 1) {{
        return host->set_features(call, 2, WH_FEATURE_STREAMING);
    }}
    return WH_STATUS_OK;
}}

wh_status demo_handle(wh_call *call, const wh_host_api *host, const wh_job *job) {{
    if (host->struct_size < sizeof(wh_host_api) || host->abi_major != WH_ABI_MAJOR) {{
        return WH_STATUS_ERROR;
    }}
    if (job->id == nullptr || job->job_json_len == 0) {{
        if (host->abi_minor >= 1) {{
            host->set_error_traceback(call, "at demo_handle", 14);
        }}
        return host->set_error(call, "BadJob", 6, nullptr, 0);
    }}
    if (host->is_cancelled(call)) {{
        return WH_STATUS_CANCELLED;
    }}
    wh_status status = host->progress(call, "{{\"percent\": 50}}", 16);
    if (status != WH_STATUS_OK) {{
        return status;
    }}
    status = host->emit(call, job->input_json, job->input_json_len);
    if (status != WH_STATUS_OK) {{
        return status;
    }}
    return host->set_output(call, job->input_json, job->input_json_len);
}}

void demo_teardown(wh_call *call, const wh_host_api *host) {{
    host->request_recycle(call);
}}

const wh_handler_descriptor DESCRIPTOR = {{
    sizeof(wh_handler_descriptor),
    WH_ABI_MAJOR,
    WH_ABI_MINOR,
    "demo",
    "1.0.0",
    1,
    0,
    WH_FEATURE_STREAMING,
    demo_init,
    demo_handle,
    demo_teardown,
}};

}} // namespace

const wh_handler_descriptor *wh_handler_entry(void) {{
    wh_handler_entry_fn self_check = wh_handler_entry;
    static_cast<void>(self_check);
    return &DESCRIPTOR;
}}
"#,
        asserts = static_assertions("static_assert"),
    )
}

/// Compiles `source` (saved as `file_name`) to an object file with the compiler from `var` or
/// `default`, `-I` the header's folder, and `flags`; fails the test with the compiler's stderr.
fn compile_object(var: &str, default: &str, file_name: &str, source: &str, flags: &[&str]) {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let path = write_source(dir.path(), file_name, source);
    let mut compile = compiler(var, default);
    compile
        .args(flags)
        .arg("-I")
        .arg(include_dir())
        .arg("-c")
        .arg(&path)
        .arg("-o")
        .arg(dir.path().join("unit.o"));
    run(compile, &format!("compiling {file_name} with the header"));
}

/// `worker_host.h` compiles without a single warning as strict C11, in a unit that defines a
/// descriptor and `wh_handler_entry`, and that C compiler agrees with Rust's sizes and offsets.
#[test]
fn header_compiles_as_c11() {
    compile_object(
        "CC",
        "cc",
        "handler.c",
        &c_unit(),
        &["-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror"],
    );
}

/// `worker_host.h` compiles without a single warning as strict C++17, in a unit that defines a
/// descriptor and `wh_handler_entry`, and that C++ compiler agrees with Rust's sizes and offsets.
#[test]
fn header_compiles_as_cpp17() {
    compile_object(
        "CXX",
        "c++",
        "handler.cpp",
        &cpp_unit(),
        &["-std=c++17", "-Wall", "-Wextra", "-pedantic", "-Werror"],
    );
}

/// The frozen copy of the 1.0 header that the ABI 1.0 fixture of the end-to-end tests is built
/// against (`tests/fixtures/abi-1.0/worker_host.h`).
fn frozen_1_0_header() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/abi-1.0/worker_host.h")
}

/// ABI 1.1 only appended: each struct of the frozen 1.0 header has its 1.0 fields at the front
/// of today's, in the same order, and a C compiler given the 1.0 header puts each at the offset
/// and size the Rust mirror (today's layout) has it at.
#[test]
fn today_s_structs_extend_the_1_0_structs() {
    let frozen_text = std::fs::read_to_string(frozen_1_0_header()).expect("the frozen header");
    assert!(
        frozen_text.contains("#define WH_ABI_MINOR 0"),
        "the frozen copy is the 1.0 header"
    );
    let frozen = strip_comments(&frozen_text);
    let mut program =
        String::from("#include <stdio.h>\n#include <worker_host.h>\n\nint main(void) {\n");
    let mut expected = BTreeMap::new();
    for layout in rust_structs() {
        let old_fields = header_fields(&frozen, layout.name);
        let today: Vec<&str> = layout.fields.iter().map(|f| f.name).collect();
        assert!(
            today.starts_with(&old_fields.iter().map(String::as_str).collect::<Vec<_>>()),
            "{}: the 1.0 fields {old_fields:?} are not the front of today's {today:?}",
            layout.name
        );
        for field in &layout.fields[..old_fields.len()] {
            let (ty, f) = (layout.name, field.name);
            writeln!(
                program,
                "    printf(\"{ty}.{f} %zu %zu\\n\", (size_t)offsetof({ty}, {f}), (size_t)sizeof((({ty} *)0)->{f}));"
            )
            .unwrap();
            expected.insert(
                format!("{ty}.{f}"),
                format!("{} {}", field.offset, field.size),
            );
        }
    }
    program.push_str("    return 0;\n}\n");
    let dir = tempfile::tempdir().expect("create a temp dir");
    let source = write_source(dir.path(), "layout_1_0.c", &program);
    let binary = dir.path().join("layout_1_0");
    let mut compile = compiler("CC", "cc");
    compile
        .args(["-std=c11", "-Wall", "-Wextra", "-pedantic", "-Werror", "-I"])
        .arg(frozen_1_0_header().parent().expect("a folder"))
        .arg(&source)
        .arg("-o")
        .arg(&binary);
    run(compile, "compiling the 1.0 layout program");
    let printed = run(Command::new(&binary), "running the 1.0 layout program");
    let from_c: BTreeMap<String, String> = printed
        .lines()
        .map(|line| {
            let (name, value) = line.split_once(' ').expect("name and value");
            (name.to_owned(), value.to_owned())
        })
        .collect();
    assert_eq!(
        from_c, expected,
        "1.0 layout (C, left) against today's (Rust, right)"
    );
}
