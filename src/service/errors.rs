//! Storage errors as control-protocol errors.

use std::path::Path;

use crate::cache::CacheError;
use crate::catalog::CatalogError;
use crate::control::{ApiError, ErrorCode};

/// An error and its sources, joined with `: `.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

pub fn catalog_err(e: CatalogError) -> ApiError {
    let code = match &e {
        CatalogError::NotFound { .. } => ErrorCode::NotFound,
        CatalogError::Exists { .. } => ErrorCode::Exists,
        CatalogError::InUse { .. } => ErrorCode::InUse,
        CatalogError::BadName { .. } => ErrorCode::BadName,
        CatalogError::BadDigest(_)
        | CatalogError::Invalid { .. }
        | CatalogError::Ambiguous { .. }
        | CatalogError::TooLarge { .. } => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    ApiError::new(code, chain(&e))
}

pub fn cache_err(e: CacheError) -> ApiError {
    let code = match e {
        CacheError::Catalog(c) => return catalog_err(c),
        CacheError::InUse { .. } => ErrorCode::InUse,
        CacheError::DigestMismatch { .. } => ErrorCode::BadDigest,
        CacheError::OverBudget { .. } => ErrorCode::NoSpace,
        CacheError::BadUrl { .. } | CacheError::NotAFile { .. } => ErrorCode::BadRequest,
        CacheError::Io { ref source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            ErrorCode::NoSpace
        }
        CacheError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            ErrorCode::NotFound
        }
        _ => ErrorCode::Io,
    };
    ApiError::new(code, chain(&e))
}

/// `map_err` for an I/O error on `path` while doing `op`.
pub fn io_api<'a>(op: &'a str, path: &'a Path) -> impl Fn(std::io::Error) -> ApiError + 'a {
    move |e| {
        let code = if e.raw_os_error() == Some(libc::ENOSPC) {
            ErrorCode::NoSpace
        } else {
            ErrorCode::Io
        };
        ApiError::new(code, format!("cannot {op} {}: {e}", path.display()))
    }
}
