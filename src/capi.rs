//! The C API (`include/turbine.h`): opaque handles, status codes and a thread-local error
//! message, over the engine's single-sequence path.
//!
//! Conventions, kept by every function here:
//! - no Rust type crosses the boundary: handles are `Box`es turned into raw pointers, the
//!   rest is integers, floats, C strings and caller-owned buffers;
//! - every body runs inside [`std::panic::catch_unwind`]: a panic becomes
//!   `TURBINE_ERR_INTERNAL` and a message, never an unwind into C;
//! - caller input is checked (null, alignment, sizes, UTF-8, token ranges) before use, and a
//!   failure sets the message that `turbine_last_error` returns on the same thread.
//!
//! The functions are `unsafe extern "C"`: their safety contract is the header's (valid,
//! live handles; buffers at least as large as the sizes given).

mod context;
mod model;
mod sampling;

pub use context::*;
pub use model::*;
pub use sampling::*;

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use turbine_engine::gguf::GgufError;
use turbine_engine::EngineError;

/// A status code: 0 on success, negative on failure (`turbine_status` in C).
pub type TurbineStatus = i32;
/// A token id (`turbine_token` in C); valid ids are 0 ≤ id < `turbine_model_n_vocab`.
pub type TurbineToken = i32;

pub const TURBINE_OK: TurbineStatus = 0;
/// A required pointer argument was NULL.
pub const TURBINE_ERR_NULL_ARGUMENT: TurbineStatus = -1;
/// An argument is out of its documented range, misaligned, or not valid UTF-8.
pub const TURBINE_ERR_INVALID_ARGUMENT: TurbineStatus = -2;
/// The caller's buffer is too small; the needed size was reported.
pub const TURBINE_ERR_BUFFER_TOO_SMALL: TurbineStatus = -3;
/// A token id is negative or not below the vocabulary size.
pub const TURBINE_ERR_TOKEN_OUT_OF_RANGE: TurbineStatus = -4;
/// A file could not be opened or read.
pub const TURBINE_ERR_IO: TurbineStatus = -5;
/// A model file is corrupt, truncated or of an unsupported kind.
pub const TURBINE_ERR_MODEL: TurbineStatus = -6;
/// The tokens do not fit in the context's length.
pub const TURBINE_ERR_CONTEXT_FULL: TurbineStatus = -7;
/// The call needs state the handle does not have yet (logits before any decode).
pub const TURBINE_ERR_INVALID_STATE: TurbineStatus = -8;
/// A bug inside Turbine (a caught panic).
pub const TURBINE_ERR_INTERNAL: TurbineStatus = -9;
/// The device asked for cannot be used, or it failed.
pub const TURBINE_ERR_DEVICE: TurbineStatus = -10;

/// A failure on its way to C: the status to return and the message to keep.
#[derive(Debug)]
pub(crate) struct Error {
    status: TurbineStatus,
    message: String,
}

pub(crate) type Res<T> = Result<T, Error>;

pub(crate) fn error(status: TurbineStatus, message: impl Into<String>) -> Error {
    Error { status, message: message.into() }
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::Io { .. } | EngineError::ModelNotFound { .. } => TURBINE_ERR_IO,
            EngineError::Gguf(GgufError::Io { .. }) => TURBINE_ERR_IO,
            EngineError::TokenOutOfRange { .. } => TURBINE_ERR_TOKEN_OUT_OF_RANGE,
            EngineError::ContextFull { .. } => TURBINE_ERR_CONTEXT_FULL,
            EngineError::BadBatch(_) => TURBINE_ERR_INVALID_ARGUMENT,
            EngineError::NoDevice { .. } | EngineError::Device { .. } => TURBINE_ERR_DEVICE,
            _ => TURBINE_ERR_MODEL,
        };
        error(status, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// The message of the last failed call on this thread ("" when none has failed). Successful
/// calls leave it as it is. The string belongs to Turbine and stays valid until the next
/// failing call on this thread.
#[no_mangle]
pub extern "C" fn turbine_last_error() -> *const c_char {
    // A thread-local CString's buffer lives until it is replaced or the thread exits.
    catch_unwind(|| LAST_ERROR.with(|e| e.borrow().as_ptr())).unwrap_or(c"internal error".as_ptr())
}

/// A fixed description of a status code (never NULL).
#[no_mangle]
pub extern "C" fn turbine_status_string(status: TurbineStatus) -> *const c_char {
    let s = match status {
        TURBINE_OK => c"ok",
        TURBINE_ERR_NULL_ARGUMENT => c"null argument",
        TURBINE_ERR_INVALID_ARGUMENT => c"invalid argument",
        TURBINE_ERR_BUFFER_TOO_SMALL => c"buffer too small",
        TURBINE_ERR_TOKEN_OUT_OF_RANGE => c"token out of range",
        TURBINE_ERR_IO => c"i/o error",
        TURBINE_ERR_MODEL => c"invalid model file",
        TURBINE_ERR_CONTEXT_FULL => c"context full",
        TURBINE_ERR_INVALID_STATE => c"invalid state",
        TURBINE_ERR_INTERNAL => c"internal error",
        TURBINE_ERR_DEVICE => c"device unavailable or failed",
        _ => c"unknown status",
    };
    s.as_ptr()
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(|s| s.as_str()));
    format!("internal error (panic): {}", text.unwrap_or("unknown cause"))
}

/// Runs an API body: errors and panics become a status and the thread's last error.
pub(crate) fn guard(body: impl FnOnce() -> Res<()>) -> TurbineStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => TURBINE_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(payload) => {
            set_last_error(&panic_message(payload.as_ref()));
            TURBINE_ERR_INTERNAL
        }
    }
}

/// [`guard`] for functions that return a value: `on_error` replaces it on failure.
pub(crate) fn guard_value<T>(on_error: impl FnOnce(TurbineStatus) -> T, body: impl FnOnce() -> Res<T>) -> T {
    let mut value = None;
    let status = guard(|| body().map(|v| value = Some(v)));
    value.unwrap_or_else(|| on_error(status))
}

fn null(name: &str) -> Error {
    error(TURBINE_ERR_NULL_ARGUMENT, format!("{name} is NULL"))
}

fn check_ptr<T>(p: *const T, name: &str) -> Res<()> {
    if p.is_null() {
        return Err(null(name));
    }
    if !p.is_aligned() {
        return Err(error(TURBINE_ERR_INVALID_ARGUMENT, format!("{name} is not aligned for its type")));
    }
    Ok(())
}

/// A handle or struct argument; NULL is an error.
///
/// # Safety
/// A non-null `p` must point to a live `T` for `'a`.
pub(crate) unsafe fn arg<'a, T>(p: *const T, name: &str) -> Res<&'a T> {
    check_ptr(p, name)?;
    Ok(&*p)
}

/// A mutable handle argument; NULL is an error.
///
/// # Safety
/// A non-null `p` must point to a live `T` not otherwise borrowed for `'a`.
pub(crate) unsafe fn arg_mut<'a, T>(p: *mut T, name: &str) -> Res<&'a mut T> {
    check_ptr(p, name)?;
    Ok(&mut *p)
}

fn check_len<T>(p: *const T, len: usize, name: &str) -> Res<()> {
    if len.checked_mul(size_of::<T>()).is_none_or(|bytes| bytes > isize::MAX as usize) {
        return Err(error(TURBINE_ERR_INVALID_ARGUMENT, format!("{name}: size {len} is too large")));
    }
    check_ptr(p, name)
}

/// An input array of `len` elements; NULL is allowed only when `len` is 0.
///
/// # Safety
/// A non-null `p` must point to `len` readable elements.
pub(crate) unsafe fn slice_arg<'a, T>(p: *const T, len: usize, name: &str) -> Res<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    check_len(p, len, name)?;
    Ok(std::slice::from_raw_parts(p, len))
}

/// An output array of `len` elements; NULL is allowed only when `len` is 0.
///
/// # Safety
/// A non-null `p` must point to `len` writable elements.
pub(crate) unsafe fn slice_out<'a, T>(p: *mut T, len: usize, name: &str) -> Res<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_len(p, len, name)?;
    Ok(std::slice::from_raw_parts_mut(p, len))
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// A non-null `p` must point to a NUL-terminated string.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(null(name));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|e| error(TURBINE_ERR_INVALID_ARGUMENT, format!("{name} is not valid UTF-8: {e}")))
}

/// Stores `value` through an optional out-pointer (NULL: the caller does not want it).
///
/// # Safety
/// A non-null `p` must point to a writable `T`.
pub(crate) unsafe fn write_opt<T>(p: *mut T, value: T) -> Res<()> {
    if p.is_null() {
        return Ok(());
    }
    check_ptr(p, "output pointer")?;
    p.write(value);
    Ok(())
}

/// Copies `bytes` and a terminating NUL into `buf` (`size` bytes), reporting the length
/// (without the NUL) through `len_out`; a buffer under `len + 1` bytes gets nothing but an
/// empty string (when it has room for one) and `TURBINE_ERR_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `buf` must be NULL with `size` 0, or point to `size` writable bytes; `len_out` NULL or
/// writable.
pub(crate) unsafe fn write_text(bytes: &[u8], buf: *mut c_char, size: usize, len_out: *mut usize) -> Res<()> {
    let out = slice_out(buf.cast::<u8>(), size, "buf")?;
    write_opt(len_out, bytes.len())?;
    if out.len() <= bytes.len() {
        if let Some(first) = out.first_mut() {
            *first = 0;
        }
        let needed = bytes.len() + 1;
        return Err(error(TURBINE_ERR_BUFFER_TOO_SMALL, format!("buffer of {size} bytes, {needed} needed")));
    }
    out[..bytes.len()].copy_from_slice(bytes);
    out[bytes.len()] = 0;
    Ok(())
}

/// A usize count as a C `int32_t` result.
pub(crate) fn to_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: turbine_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(turbine_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn panics_become_a_status_and_a_message() {
        assert_eq!(guard(|| panic!("boom")), TURBINE_ERR_INTERNAL);
        assert!(last_error().contains("boom"), "{}", last_error());
        assert_eq!(guard_value(|s| s, || -> Res<i32> { panic!("bang {}", 7) }), TURBINE_ERR_INTERNAL);
        assert!(last_error().contains("bang 7"), "{}", last_error());
        assert_eq!(guard(|| Ok(())), TURBINE_OK);
        assert!(last_error().contains("bang 7"), "success keeps the last message");
    }

    #[test]
    fn text_output_reports_the_needed_size() {
        let mut buf = [b'x' as c_char; 4];
        let mut len = 0;
        // SAFETY: buf has the sizes given; len is writable.
        let small = unsafe { write_text(b"abcd", buf.as_mut_ptr(), 4, &mut len) };
        assert_eq!((small.map_err(|e| e.status), len, buf[0]), (Err(TURBINE_ERR_BUFFER_TOO_SMALL), 4, 0));
        let mut buf = [0 as c_char; 5];
        // SAFETY: as above.
        assert!(unsafe { write_text(b"abcd", buf.as_mut_ptr(), 5, &mut len) }.is_ok());
        assert_eq!(buf.map(|c| c as u8), *b"abcd\0");
        // SAFETY: NULL with size 0 is allowed; a NULL length pointer is ignored.
        let query = unsafe { write_text(b"ab", std::ptr::null_mut(), 0, std::ptr::null_mut()) };
        assert_eq!(query.map_err(|e| e.status), Err(TURBINE_ERR_BUFFER_TOO_SMALL));
    }
}
