//! Every place doppler acts with rights other than its caller's. The rule (README, Security):
//! **no expression that a non-superuser can influence is ever evaluated with more rights than
//! that user has.**
//!
//! * [`as_owner`]: a user's table (claim, read sources, dedup lookups, write vectors, hashes and
//!   model tags, status counts, search scans, watch's DDL) is touched only as the table's owner,
//!   in a security-restricted operation (like autovacuum, `CREATE INDEX` and `REFRESH
//!   MATERIALIZED VIEW`), with `search_path` pinned to `pg_catalog, pg_temp` and every setting
//!   the owner's code changes undone afterwards. The owner's casts, operators, index
//!   expressions, triggers, rules, policies and CHECK functions then run with its own rights.
//! * [`as_catalog`]: doppler's own tables (`doppler.watched`, `failures`, `batches`) are read and
//!   written as the extension owner (or the worker), under the same pinned `search_path`, by
//!   statements that name only `doppler.*` and `pg_catalog` objects, schema-qualified
//!   (`OPERATOR(pg_catalog.=)`). Values cross between the two as plain data (oids, text,
//!   `real[]`), never as expressions over user columns.
//! * [`pin_session_search_path`]: the background worker (a superuser connection) pins its whole
//!   session, so that neither `ALTER DATABASE ... SET search_path` by a database owner nor
//!   objects in `public` reach its statements.
//!
//! Nothing else in doppler changes the current user.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The only search_path doppler's privileged statements run under.
pub const PINNED_SEARCH_PATH: &str = "pg_catalog, pg_temp";

/// The extension owner (a superuser: doppler's control file says `superuser = true`).
pub fn extension_owner() -> pg_sys::Oid {
    Spi::get_one::<pg_sys::Oid>(
        "SELECT e.extowner FROM pg_catalog.pg_extension e
         WHERE e.extname OPERATOR(pg_catalog.=) 'doppler'::pg_catalog.name",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| pgrx::error!("extension doppler is not installed"))
}

/// The version of doppler's SQL objects in this database (`ALTER EXTENSION doppler UPDATE`
/// brings it to the library's, `env!("CARGO_PKG_VERSION")`).
pub fn extension_version() -> Option<String> {
    Spi::get_one::<String>(
        "SELECT e.extversion FROM pg_catalog.pg_extension e
         WHERE e.extname OPERATOR(pg_catalog.=) 'doppler'::pg_catalog.name",
    )
    .ok()
    .flatten()
}

/// Runs `f` as `owner`, the owner of the user table `f` touches: a security-restricted
/// operation with a pinned search_path; settings changed inside are reverted.
pub fn as_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    switch(
        owner,
        pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION,
        f,
    )
}

/// Runs `f` as `role` (the extension owner, or the worker) for statements over `doppler.*`
/// only, after the caller's rights were checked; search_path pinned.
pub fn as_catalog<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    switch(role, pg_sys::SECURITY_LOCAL_USERID_CHANGE, f)
}

fn switch<R>(role: pg_sys::Oid, flags: u32, f: impl FnOnce() -> R) -> R {
    let (mut saved_user, mut saved_ctx) = (pg_sys::InvalidOid, 0);
    // SAFETY: the same calls fmgr_security_definer and autovacuum make. On ERROR, the
    // (sub)transaction abort restores the user, the security context and the GUC nest level.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_ctx);
        pg_sys::SetUserIdAndSecContext(role, saved_ctx | flags as i32);
        let nest = pg_sys::NewGUCNestLevel();
        pin_search_path(
            pg_sys::GucAction::GUC_ACTION_SAVE,
            pg_sys::GucSource::PGC_S_SESSION,
        );
        nest
    };
    let r = f();
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_ctx);
    }
    r
}

unsafe fn pin_search_path(action: pg_sys::GucAction::Type, source: pg_sys::GucSource::Type) {
    pg_sys::set_config_option(
        c"search_path".as_ptr(),
        c"pg_catalog, pg_temp".as_ptr(),
        pg_sys::GucContext::PGC_USERSET,
        source,
        action,
        true,
        0,
        false,
    );
}

/// Pins the search_path of this whole session (the background worker's).
pub fn pin_session_search_path() {
    // PGC_S_OVERRIDE: above database and role defaults and the configuration file.
    unsafe {
        pin_search_path(
            pg_sys::GucAction::GUC_ACTION_SET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        )
    };
}

/// Whether `role` has the privileges of `owner` (is it, or a member of it).
pub fn acts_as(role: pg_sys::Oid, owner: pg_sys::Oid) -> bool {
    unsafe { pg_sys::has_privs_of_role(role, owner) }
}

/// The current user (the caller, outside [`as_owner`] and [`as_catalog`]).
pub fn current_user() -> pg_sys::Oid {
    unsafe { pg_sys::GetUserId() }
}
