//! Archive builders for tests: well-formed entries through the `tar`/`zip` writers, and
//! raw tar headers for what a hostile archive holds (the writers refuse those names).

use std::io::{self, Write};

use tar::{EntryType, Header};

pub(crate) fn tar_bytes(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

pub(crate) fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    b.append_data(&mut h, path, data).unwrap();
}

pub(crate) fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Directory);
    h.set_size(0);
    h.set_mode(mode);
    b.append_data(&mut h, path, io::empty()).unwrap();
}

pub(crate) fn add_link(b: &mut tar::Builder<Vec<u8>>, ty: EntryType, path: &str, target: &str) {
    let mut h = Header::new_gnu();
    h.set_entry_type(ty);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, path, target).unwrap();
}

/// A header with any name at all: the builder refuses `..` and absolute names, which
/// is exactly what a hostile archive contains.
pub(crate) fn add_raw(b: &mut tar::Builder<Vec<u8>>, name: &[u8], ty: EntryType, data: &[u8], link: Option<&str>) {
    let mut h = Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_entry_type(ty);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    if let Some(l) = link {
        h.set_link_name(l).unwrap();
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

pub(crate) fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub(crate) fn bz2(data: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub(crate) fn zip_bytes(build: impl FnOnce(&mut zip::ZipWriter<io::Cursor<Vec<u8>>>)) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(io::Cursor::new(Vec::new()));
    build(&mut z);
    z.finish().unwrap().into_inner()
}

pub(crate) fn zopts(mode: u32) -> zip::write::SimpleFileOptions {
    zip::write::SimpleFileOptions::default().unix_permissions(mode)
}
