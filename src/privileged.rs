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
//! * Rights checks, the caller's or an owner's: [`owned_table`] (the caller owns the table),
//!   [`may_read_server_files`] and [`may_fetch_urls`] (a role may read what a path or a URL
//!   names), [`check_may_read`] (the caller, before reading a source it names).
//!
//! Nothing else in doppler changes the current user or decides whose rights suffice.

use doppler_core::fetch;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::{raise, Code};

/// The only search_path doppler's privileged statements run under.
pub const PINNED_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// The extension owner (a superuser: doppler's control file says `superuser = true`).
pub fn extension_owner() -> pg_sys::Oid {
    Spi::get_one::<pg_sys::Oid>(
        "SELECT e.extowner FROM pg_catalog.pg_extension e
         WHERE e.extname OPERATOR(pg_catalog.=) 'doppler'::pg_catalog.name",
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        raise(
            Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "extension doppler is not installed in this database",
            "",
        )
    })
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
        PINNED_SEARCH_PATH.as_ptr(),
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

/// A table the caller owns: its quoted name and its owner.
pub struct OwnedTable {
    pub name: String,
    pub owner: pg_sys::Oid,
}

/// The table, which the caller must own (or be a member of its owner role): 42P01 when there is
/// none, 42809 when it is not a table, 42501 when the caller does not own it.
pub fn owned_table(relid: pg_sys::Oid) -> OwnedTable {
    let row = Spi::get_three_with_args::<String, pg_sys::Oid, String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), c.relowner, c.relkind::pg_catalog.text
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[relid.into()],
    );
    let Ok((Some(name), Some(owner), Some(kind))) = row else {
        raise(
            Code::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", relid.to_u32()),
            "",
        )
    };
    if kind != "r" && kind != "p" {
        raise(
            Code::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{name} is not a table"),
            "doppler watches tables and partitioned tables.",
        );
    }
    if !acts_as(current_user(), owner) {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of table {name}"),
            "",
        );
    }
    OwnedTable { name, owner }
}

/// Whether `role` may read server files: a superuser or a member of pg_read_server_files (the
/// rule `COPY ... FROM 'file'` follows).
pub fn may_read_server_files(role: pg_sys::Oid) -> bool {
    // SAFETY: plain catalog lookups, in a transaction.
    unsafe {
        pg_sys::superuser_arg(role)
            || pg_sys::has_privs_of_role(role, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_SERVER_FILES))
    }
}

/// Whether `role` may fetch URLs: a superuser or a member of doppler_url_reader.
pub fn may_fetch_urls(role: pg_sys::Oid) -> bool {
    // SAFETY: plain catalog lookups, in a transaction.
    unsafe {
        if pg_sys::superuser_arg(role) {
            return true;
        }
        let reader = pg_sys::get_role_oid(c"doppler_url_reader".as_ptr(), true);
        reader != pg_sys::InvalidOid && pg_sys::has_privs_of_role(role, reader)
    }
}

/// Raises 42501 unless the caller may read what the text source `s` names: a URL (superusers and
/// doppler_url_reader members) or a server file (superusers and pg_read_server_files members).
pub fn check_may_read(s: &str) {
    if fetch::is_url(s) {
        // (another scheme is refused by the URL policy, with its own message)
        let http = s.starts_with("http://") || s.starts_with("https://");
        if http && !may_fetch_urls(current_user()) {
            raise(
                Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to fetch image URL \"{s}\""),
                "Only superusers and members of doppler_url_reader may fetch URLs.",
            );
        }
    } else if !may_read_server_files(current_user()) {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to read image file \"{s}\""),
            "Only superusers and roles with privileges of pg_read_server_files may read server files; others can pass the image as bytea.",
        );
    }
}
