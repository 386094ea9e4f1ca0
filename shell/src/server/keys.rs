//! API keys for hosted mode: created, listed and revoked by `turbine keys`, checked by the
//! server on every request.
//!
//! A key is `tb-` and 64 hex digits (256 random bits). Only its SHA-256 is stored, in
//! `keys.json` under Turbine's home directory (TURBINE_HOME, default `~/.turbine`), mode
//! 0600, replaced atomically (temp file + rename) under an exclusive lock on `keys.lock`,
//! so the CLI and a running server never lose each other's changes. The server notices a
//! changed file (inode, length, mtime) on the next request, with no restart.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the server keeps for one key; never the key itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KeyRecord {
    /// Short public id (8 hex digits), used to revoke.
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// Requests per minute (None: unlimited).
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Prompt plus generated tokens per minute (None: unlimited).
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Unix seconds.
    pub created: u64,
    #[serde(default)]
    pub last_used: Option<u64>,
    /// SHA-256 of the key, hex.
    pub sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeyFile {
    keys: Vec<KeyRecord>,
}

/// Turbine's own state directory: TURBINE_HOME, else `~/.turbine`.
pub fn home_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TURBINE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".turbine")
}

pub fn keys_path() -> PathBuf {
    home_dir().join("keys.json")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| format!("cannot get random bytes from the system: {e}"))?;
    Ok(buf)
}

/// Holds the exclusive lock on `keys.lock` beside the key file while alive.
struct FileLock(File);

impl FileLock {
    fn take(path: &Path) -> Result<FileLock, String> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let lock_path = dir.join("keys.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        f.lock().map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn read_file(path: &Path) -> Result<KeyFile, String> {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyFile::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| format!("{} is not a valid key file: {e}", path.display()))
        }
    }
}

/// Writes the whole file to a private temp file, syncs it and renames it over the old one.
fn write_file(path: &Path, file: &KeyFile) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".keys.{}.tmp", std::process::id()));
    let body = serde_json::to_vec_pretty(file).map_err(|e| format!("cannot encode the key file: {e}"))?;
    let write = || -> std::io::Result<()> {
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// Reads, changes and writes the key file under the lock.
fn update<T>(path: &Path, change: impl FnOnce(&mut KeyFile) -> Result<T, String>) -> Result<T, String> {
    let _lock = FileLock::take(path)?;
    let mut file = read_file(path)?;
    let out = change(&mut file)?;
    write_file(path, &file)?;
    Ok(out)
}

/// Creates a key; returns its record and the key, which is shown once and never stored.
pub fn create(path: &Path, name: &str, rpm: Option<u64>, tpm: Option<u64>) -> Result<(KeyRecord, String), String> {
    if name.len() > 200 || name.chars().any(char::is_control) {
        return Err("a key name has at most 200 characters and no control characters".into());
    }
    let secret = format!("tb-{}", hex(&random_bytes::<32>()?));
    let digest = hex(&sha256(secret.as_bytes()));
    let record = update(path, |file| {
        let id = loop {
            let id = hex(&random_bytes::<4>()?);
            if !file.keys.iter().any(|k| k.id == id) {
                break id;
            }
        };
        let record =
            KeyRecord { id, name: name.to_string(), rpm, tpm, created: unix_now(), last_used: None, sha256: digest };
        file.keys.push(record.clone());
        Ok(record)
    })?;
    Ok((record, secret))
}

pub fn list(path: &Path) -> Result<Vec<KeyRecord>, String> {
    Ok(read_file(path)?.keys)
}

pub fn revoke(path: &Path, id: &str) -> Result<KeyRecord, String> {
    update(path, |file| {
        let i = file.keys.iter().position(|k| k.id == id).ok_or_else(|| format!("no key with id {id:?}"))?;
        Ok(file.keys.remove(i))
    })
}

/// A key the server accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub id: String,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    digest: [u8; 32],
}

impl Key {
    #[cfg(test)]
    pub fn for_tests(id: &str, rpm: Option<u64>, tpm: Option<u64>) -> Key {
        Key { id: id.into(), rpm, tpm, digest: [0; 32] }
    }
}

/// The server's view of the key file, reloaded when the file changes.
pub struct KeyRing {
    path: PathBuf,
    /// Require a key even when none exists (`turbine serve --require-auth`).
    require: bool,
    state: Mutex<Loaded>,
    /// When each key was last used (unix seconds), not yet written to the file.
    used: Mutex<HashMap<String, u64>>,
}

struct Loaded {
    /// (inode, length, mtime) of the file last read; None when it did not exist.
    stamp: Option<(u64, u64, SystemTime)>,
    /// Err when the file is unreadable: every request is refused until it is fixed.
    keys: Result<Arc<Vec<Key>>, String>,
}

impl Default for Loaded {
    fn default() -> Self {
        Loaded { stamp: None, keys: Ok(Arc::default()) }
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq)]
pub enum Denied {
    /// No key, or no key that matches.
    Unauthorized,
    /// The key file cannot be read; the message names it (for the log, not the client).
    KeyFile(String),
}

fn stamp(path: &Path) -> Option<(u64, u64, SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((ino, m.len(), m.modified().ok()?))
}

impl KeyRing {
    pub fn new(path: PathBuf, require: bool) -> KeyRing {
        let ring = KeyRing { path, require, state: Mutex::new(Loaded::default()), used: Mutex::new(HashMap::new()) };
        // A bad file is reported per request (and fails closed) rather than here.
        let _ = ring.refresh();
        ring
    }

    /// The keys as the file now stands (re-read if it changed), and whether it exists.
    fn refresh(&self) -> (Result<Arc<Vec<Key>>, String>, bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamp(&self.path);
        if now != state.stamp || now.is_none() && state.keys.is_err() {
            state.keys = read_file(&self.path).and_then(|f| {
                f.keys
                    .into_iter()
                    .map(|r| {
                        let digest = unhex32(&r.sha256).ok_or_else(|| format!("key {} has a bad sha256", r.id))?;
                        Ok(Key { id: r.id, rpm: r.rpm, tpm: r.tpm, digest })
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map(Arc::new)
            });
            state.stamp = now;
        }
        (state.keys.clone(), state.stamp.is_some())
    }

    /// Whether requests need a key: `--require-auth`, or the key file exists. It is
    /// created with the first key and stays when the last is revoked, so revoking every
    /// key locks the server rather than opening it; deleting the file opens it. An
    /// unreadable file fails closed.
    pub fn required(&self) -> bool {
        let (keys, exists) = self.refresh();
        self.require || exists || keys.is_err()
    }

    /// None when requests need no key; else the key an `Authorization` header value
    /// names: `Bearer <key>` or the bare key. Every stored digest is compared, in
    /// constant time, whatever matches.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<Option<Key>, Denied> {
        let (keys, exists) = self.refresh();
        if !(self.require || exists || keys.is_err()) {
            return Ok(None);
        }
        let keys = keys.map_err(Denied::KeyFile)?;
        let presented = authorization.map(str::trim).unwrap_or("");
        let presented = presented
            .strip_prefix("Bearer ")
            .or_else(|| presented.strip_prefix("bearer "))
            .map_or(presented, str::trim);
        if presented.is_empty() {
            return Err(Denied::Unauthorized);
        }
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        for k in keys.iter() {
            if bool::from(subtle::ConstantTimeEq::ct_eq(&k.digest[..], &digest[..])) {
                found = Some(k.clone());
            }
        }
        let key = found.ok_or(Denied::Unauthorized)?;
        self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(key.id.clone(), unix_now());
        Ok(Some(key))
    }

    /// Writes the last-used times gathered since the previous call into the key file.
    pub fn flush_last_used(&self) -> Result<(), String> {
        let used = std::mem::take(&mut *self.used.lock().unwrap_or_else(|e| e.into_inner()));
        // Never create the file here: that would turn authentication on.
        if used.is_empty() || !self.path.exists() {
            return Ok(());
        }
        update(&self.path, |file| {
            for k in &mut file.keys {
                if let Some(&t) = used.get(&k.id) {
                    k.last_used = Some(k.last_used.map_or(t, |old| old.max(t)));
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_keys() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("turbine-keys-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("keys.json")
    }

    #[test]
    fn create_check_revoke() {
        let path = temp_keys();
        let ring = KeyRing::new(path.clone(), false);
        assert!(!ring.required());
        let (rec, secret) = create(&path, "ci", Some(10), None).unwrap();
        assert!(secret.starts_with("tb-") && secret.len() == 67);
        let stored = std::fs::read_to_string(&path).unwrap();
        assert!(!stored.contains(&secret[3..]), "the key itself must never be stored");
        #[cfg(unix)]
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions()) & 0o777,
            0o600
        );
        assert!(ring.required());
        assert_eq!(ring.authorize(Some(&format!("Bearer {secret}"))).unwrap().unwrap().id, rec.id);
        assert_eq!(ring.authorize(Some(&secret)).unwrap().unwrap().rpm, Some(10));
        assert_eq!(ring.authorize(Some("Bearer tb-00")), Err(Denied::Unauthorized));
        assert_eq!(ring.authorize(None), Err(Denied::Unauthorized));
        ring.flush_last_used().unwrap();
        assert!(list(&path).unwrap()[0].last_used.is_some());
        revoke(&path, &rec.id).unwrap();
        assert_eq!(ring.authorize(Some(&secret)), Err(Denied::Unauthorized));
        assert!(ring.required(), "revoking the last key does not open the server");
        std::fs::remove_file(&path).unwrap();
        assert!(!ring.required());
        assert_eq!(ring.authorize(None), Ok(None));
        assert!(revoke(&path, &rec.id).is_err());
    }

    #[test]
    fn corrupt_file_fails_closed() {
        let path = temp_keys();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{not json").unwrap();
        let ring = KeyRing::new(path.clone(), false);
        assert!(ring.required());
        assert!(matches!(ring.authorize(Some("Bearer x")), Err(Denied::KeyFile(_))));
    }
}
