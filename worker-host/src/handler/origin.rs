//! Where a handler's own libraries are, although the host loads a private copy of it.
//!
//! A handler built with a run path relative to itself (`-Wl,-rpath,'$ORIGIN'`, `$ORIGIN/lib`,
//! `$ORIGIN/../lib`, as CMake installs and bundled wheels do) finds its libraries next to the file
//! the user named. Loaded from the private copy, `$ORIGIN` names the private directory instead,
//! so [`library_dirs`] reads the run path from the file's dynamic section (`DT_RUNPATH`, or the
//! older `DT_RPATH`) and expands every entry that uses `$ORIGIN` against the original's
//! directory; the runner gets those directories, and the original's own, at the end of its
//! `LD_LIBRARY_PATH`. The file is read lazily (its headers, dynamic section and string table),
//! never whole.

use object::read::elf::{Dyn, ElfFile64};
use std::path::{Path, PathBuf};

/// The directories the handler in `library` (the private copy: the bytes that are loaded)
/// finds its libraries in through `$ORIGIN`, expanded against `origin` (the directory of the
/// file the user named), with `origin` itself last; only `origin` when the file cannot be read
/// as a 64-bit ELF file (loading it then says why).
pub fn library_dirs(library: &Path, origin: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = run_path(library)
        .iter()
        .flat_map(|entries| entries.split(':'))
        .filter(|entry| entry.contains("$ORIGIN") || entry.contains("${ORIGIN}"))
        .map(|entry| {
            let origin = origin.to_string_lossy();
            PathBuf::from(
                entry
                    .replace("${ORIGIN}", &origin)
                    .replace("$ORIGIN", &origin),
            )
        })
        .collect();
    dirs.push(origin.to_path_buf());
    dirs.dedup();
    dirs
}

/// The `DT_RUNPATH` and `DT_RPATH` strings of the ELF file at `path`.
fn run_path(path: &Path) -> Vec<String> {
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let data = object::ReadCache::new(file);
    let Ok(elf) = ElfFile64::<object::Endianness, _>::parse(&data) else {
        return Vec::new();
    };
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let Ok(Some((dynamic, link))) = sections.dynamic(endian, &data) else {
        return Vec::new();
    };
    let Ok(strings) = sections.strings(endian, &data, link) else {
        return Vec::new();
    };
    dynamic
        .iter()
        .filter(|entry| {
            matches!(
                entry.tag32(endian),
                Some(object::elf::DT_RUNPATH | object::elf::DT_RPATH)
            )
        })
        .filter_map(|entry| {
            let offset = u32::try_from(entry.d_val(endian)).ok()?;
            let text = strings.get(offset).ok()?;
            Some(String::from_utf8_lossy(text).into_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host binary itself has no `$ORIGIN` run path: only the directory comes back.
    #[test]
    fn a_file_without_origin_gives_its_directory() {
        let exe = std::env::current_exe().unwrap();
        let origin = Path::new("/somewhere");
        assert_eq!(library_dirs(&exe, origin), vec![origin.to_path_buf()]);
        let not_elf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_elf.path(), b"text").unwrap();
        assert_eq!(
            library_dirs(not_elf.path(), origin),
            vec![origin.to_path_buf()]
        );
    }
}
