//! Records of one batch for the dashboard: by id (exact or prefix), by state, error group or
//! attempts, a page at a time with keyset paging, and one record in full.

use super::super::{sql, Store};
use crate::error::StoreError;

/// Which records of a batch a page shows.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    /// A record id, or its beginning when `prefix`.
    pub id: Option<String>,
    pub prefix: bool,
    pub state: Option<String>,
    /// An error group key (`failed --group-by error`).
    pub group: Option<String>,
    pub min_attempts: Option<i32>,
    /// Where the previous page ended ([`RecordPage::next`]).
    pub after: Option<String>,
    pub limit: i64,
}

/// One record of a page.
#[derive(Debug, Clone)]
pub struct RecordRow {
    pub record_id: String,
    pub state: String,
    pub attempt: i32,
    pub last_error: Option<String>,
    pub updated_at: String,
}

/// A page of records, and the cursor of the next one when there may be more.
#[derive(Debug, Clone)]
pub struct RecordPage {
    pub rows: Vec<RecordRow>,
    pub next: Option<String>,
}

/// One record in full.
#[derive(Debug, Clone)]
pub struct RecordDetail {
    pub record_id: String,
    pub state: String,
    pub attempt: i32,
    pub last_error: Option<String>,
    /// The payload, pretty-printed JSON.
    pub payload: String,
    pub created_at: String,
    pub updated_at: String,
    /// When a pending record may be claimed.
    pub available_at: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_id: Option<i64>,
    pub lease_expires_at: Option<String>,
}

/// The least string above every string that starts with `prefix`, in byte ("C") order, or
/// `None` when there is none (every character is the highest one).
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        // Skip the surrogate range, which no string holds.
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

impl Store {
    /// One page of batch `batch_id`'s records. Records with an error, or of one error group,
    /// are read through `record_errors` in load order; every other page through
    /// `record_lookup` in id order.
    pub async fn dashboard_records(
        &self,
        batch_id: i64,
        f: &RecordFilter,
    ) -> Result<RecordPage, StoreError> {
        let ctx = "searching records";
        let limit = f.limit + 1;
        let by_error = f.group.is_some() && f.id.is_none();
        let rows = if by_error {
            let after: i64 = f.after.as_deref().and_then(|a| a.parse().ok()).unwrap_or(0);
            self.query_indexed(
                ctx,
                sql!("dash_records_errors"),
                &[
                    &batch_id,
                    &after,
                    &f.state,
                    &f.group,
                    &f.min_attempts,
                    &limit,
                ],
            )
            .await?
        } else {
            let after = f.after.clone().unwrap_or_default();
            let (from, to) = match (&f.id, f.prefix) {
                (None, _) => (String::new(), None),
                (Some(id), true) => (id.clone(), prefix_end(id)),
                // The least string above `id` is `id` followed by U+0001.
                (Some(id), false) => (id.clone(), Some(format!("{id}\u{1}"))),
            };
            match to {
                Some(to) => {
                    self.query_indexed(
                        ctx,
                        sql!("dash_records_range"),
                        &[
                            &batch_id,
                            &from,
                            &to,
                            &after,
                            &f.state,
                            &f.min_attempts,
                            &limit,
                        ],
                    )
                    .await?
                }
                None => {
                    self.query_indexed(
                        ctx,
                        sql!("dash_records_open"),
                        &[&batch_id, &from, &after, &f.state, &f.min_attempts, &limit],
                    )
                    .await?
                }
            }
        };
        let mut page: Vec<(i64, RecordRow)> = rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    RecordRow {
                        record_id: r.get(1),
                        state: r.get(2),
                        attempt: r.get(3),
                        last_error: r.get(4),
                        updated_at: r.get(5),
                    },
                )
            })
            .collect();
        let more = page.len() as i64 > f.limit;
        page.truncate(f.limit.max(0) as usize);
        let next = match page.last() {
            Some((id, _)) if more && by_error => Some(id.to_string()),
            Some((_, row)) if more => Some(row.record_id.clone()),
            _ => None,
        };
        Ok(RecordPage {
            rows: page.into_iter().map(|(_, r)| r).collect(),
            next,
        })
    }

    /// One record of batch `batch_id` by its id, or `None`.
    pub async fn dashboard_record(
        &self,
        batch_id: i64,
        record_id: &str,
    ) -> Result<Option<RecordDetail>, StoreError> {
        let rows = self
            .query_indexed(
                "reading the record",
                sql!("dash_record"),
                &[&batch_id, &record_id],
            )
            .await?;
        Ok(rows.first().map(|r| RecordDetail {
            record_id: r.get(1),
            state: r.get(2),
            attempt: r.get(3),
            last_error: r.get(4),
            payload: r.get(5),
            created_at: r.get(6),
            updated_at: r.get(7),
            available_at: r.get(8),
            lease_owner: r.get(9),
            lease_id: r.get(10),
            lease_expires_at: r.get(11),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(prefix_end("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{D7FF}").as_deref(), Some("\u{E000}"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end(""), None);
    }
}
