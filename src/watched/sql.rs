//! The SQL that describes a watched table's rows: which rows have work to do, which are held
//! back, how a row's key and source read as text. Every identifier is quoted here and every
//! operator is schema-qualified, so the statements built from these run under the pinned
//! search_path and never reach an object the table's owner (or anyone) put in another schema.
//! The statements themselves are written out whole where they run (`fill/`, `api/status.rs`,
//! `api/search.rs`, `watch.rs`).

use pgrx::spi::{quote_identifier, quote_literal};

use super::{SourceKind, VectorKind, Watched, HELD};

/// `(vector IS NULL [OR hash IS NULL] [OR pdq IS NULL])`, columns prefixed with `prefix` (`"t."`,
/// or `""` in an index predicate): `marks` are the fingerprint columns (dHash, PDQ) filled with
/// the vector.
pub fn pending_predicate(prefix: &str, vector: &str, marks: &[&str]) -> String {
    let vec = quote_identifier(vector);
    if marks.is_empty() {
        return format!("{prefix}{vec} IS NULL");
    }
    let mut parts = vec![format!("{prefix}{vec} IS NULL")];
    parts.extend(
        marks
            .iter()
            .map(|m| format!("{prefix}{} IS NULL", quote_identifier(m))),
    );
    format!("({})", parts.join(" OR "))
}

/// `(model IS NULL OR model <> '!failed')`: the row is not held back.
pub fn unheld_predicate(prefix: &str, model: &str) -> String {
    let mc = quote_identifier(model);
    format!(
        "({prefix}{mc} IS NULL OR {prefix}{mc} OPERATOR(pg_catalog.<>) {}::pg_catalog.text)",
        quote_literal(HELD)
    )
}

/// The pending index's predicate: to do ([`pending_predicate`]), with a source, and not held
/// back. Built-in operators only, schema-qualified: the index never runs the owner's code.
pub fn pending_index_predicate(
    prefix: &str,
    source: &str,
    vector: &str,
    marks: &[&str],
    model: &str,
) -> String {
    format!(
        "{} AND {prefix}{} IS NOT NULL AND {}",
        pending_predicate(prefix, vector, marks),
        quote_identifier(source),
        unheld_predicate(prefix, model)
    )
}

impl Watched {
    /// The row key as text over table alias `alias`: the primary key value, or a row of them
    /// for a composite key.
    pub fn key_over(&self, alias: &str) -> String {
        let cols: Vec<String> = self
            .key_columns
            .iter()
            .map(|c| format!("{alias}.{}", quote_identifier(c)))
            .collect();
        if cols.len() == 1 {
            format!("{}::pg_catalog.text", cols[0])
        } else {
            format!("ROW({})::pg_catalog.text", cols.join(", "))
        }
    }

    /// `alias.column`, the column quoted.
    pub fn col(&self, alias: &str, column: &str) -> String {
        format!("{alias}.{}", quote_identifier(column))
    }

    /// The fingerprint columns filled with the vector, when NULL: the dHash's, the PDQ hash's and
    /// its quality's.
    pub fn marks(&self) -> Vec<&str> {
        [
            &self.hash_column,
            &self.pdq_column,
            &self.pdq_quality_column,
        ]
        .into_iter()
        .filter_map(|c| c.as_deref())
        .collect()
    }

    /// The rows the pending index covers, over `alias`: no vector, or no hash (with a hash
    /// column), or no PDQ hash (with a PDQ column). Its predicate adds `source IS NOT NULL` and
    /// "not held back" ([`Watched::pending_index_over`]).
    pub fn pending_over(&self, alias: &str) -> String {
        pending_predicate(&format!("{alias}."), &self.vector_column, &self.marks())
    }

    /// The pending index's own predicate, over `alias`: the same text as `watch` indexes, so
    /// that the planner proves a claim's condition implies it.
    pub fn pending_index_over(&self, alias: &str) -> String {
        pending_index_predicate(
            &format!("{alias}."),
            &self.source_column,
            &self.vector_column,
            &self.marks(),
            &self.model_column,
        )
    }

    /// Rows doppler does not hold back, over `alias`: their model column is not [`HELD`].
    pub fn unheld_over(&self, alias: &str) -> String {
        unheld_predicate(&format!("{alias}."), &self.model_column)
    }

    /// How a failure record names the row's source, over `alias`, so that a changed source is
    /// tried afresh: the path, or an md5 of the bytes.
    pub fn shown_over(&self, alias: &str) -> String {
        let src = self.col(alias, &self.source_column);
        match self.source_kind {
            SourceKind::Bytea => {
                format!("'bytea md5:' OPERATOR(pg_catalog.||) pg_catalog.md5({src})")
            }
            SourceKind::Path => format!("{src}::pg_catalog.text"),
        }
    }

    /// Over `alias`: the row's vector is there and made by the model tagged `tag` (an SQL
    /// expression: a literal or a parameter). Untagged vectors count as the table's model's:
    /// they were there before doppler, or `watch` tagged them when the model changed.
    pub fn current_vector_over(&self, alias: &str, tag: &str) -> String {
        let (vec, mc) = (
            self.col(alias, &self.vector_column),
            self.col(alias, &self.model_column),
        );
        format!("({vec} IS NOT NULL AND ({mc} IS NULL OR {mc} OPERATOR(pg_catalog.=) {tag}))")
    }

    /// Rows with work to do for model `tag` (a text value), over `alias`: no vector of that
    /// model, or (with a hash or PDQ column) no hash. What claims take, and what a due failure
    /// record needs to stay.
    pub fn todo_over(&self, alias: &str, tag: &str) -> String {
        let current = self.current_vector_over(alias, &quote_literal(tag));
        let mut parts = vec![format!("NOT {current}")];
        parts.extend(
            self.marks()
                .into_iter()
                .map(|m| format!("{} IS NULL", self.col(alias, m))),
        );
        if parts.len() == 1 {
            return parts.remove(0);
        }
        format!("({})", parts.join(" OR "))
    }

    /// `$n::real[]` cast to the vector column's type (qualified: pgvector may be in any schema).
    pub fn vector_param(&self, n: usize) -> String {
        match self.vector_kind {
            VectorKind::Real => format!("${n}::pg_catalog.float4[]"),
            VectorKind::Vector | VectorKind::Halfvec => {
                format!("${n}::pg_catalog.float4[]::{}", self.vector_type)
            }
        }
    }
}
