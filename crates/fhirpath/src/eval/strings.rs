//! String manipulation functions (FHIRPath §5.6); the `encode`/`decode` formats are in
//! `eval_strings`.

use std::borrow::Cow;

use crate::error::EvalError;
use crate::functions::Builtin;
use crate::node::Item;
use crate::parser::Expr;
use crate::value::SystemValue;

use super::{Env, R, b, eval, misrouted, single_int, single_string, val, valueless};

/// `indexOf()` … `unescape()`.
pub(super) fn call<'a>(
    f: Builtin,
    focus: Vec<Item<'a>>,
    args: &[Expr],
    regex: Option<&regex::Regex>,
    env: &Env<'_, 'a>,
    input: &[Item<'a>],
) -> R<'a> {
    use Builtin as F;
    use SystemValue as S;
    match f {
        F::IndexOf | F::LastIndexOf => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let Some(sub) = single_string(&eval(&args[0], env, input)?, f.name())? else {
                return Ok(Vec::new());
            };
            let pos = if f == F::IndexOf {
                s.find(sub.as_ref())
            } else {
                s.rfind(sub.as_ref())
            };
            val(S::Integer(
                pos.map(|p| s[..p].chars().count() as i64).unwrap_or(-1),
            ))
        }
        F::Substring => {
            let Some(s) = single_string(&focus, "substring")? else {
                return Ok(Vec::new());
            };
            let Some(start) = single_int(&eval(&args[0], env, input)?, "substring")? else {
                return Ok(Vec::new());
            };
            let len = match args.get(1) {
                Some(a) => single_int(&eval(a, env, input)?, "substring")?,
                None => None,
            };
            let count = s.chars().count() as i64;
            if start < 0 || start >= count {
                return Ok(Vec::new());
            }
            let take = len.map(|l| l.max(0)).unwrap_or(count);
            let r: String = s.chars().skip(start as usize).take(take as usize).collect();
            Ok(vec![Item::string(r)])
        }
        F::StartsWith | F::EndsWith | F::Contains => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let Some(arg) = single_string(&eval(&args[0], env, input)?, f.name())? else {
                return Ok(Vec::new());
            };
            b(match f {
                F::StartsWith => s.starts_with(arg.as_ref()),
                F::EndsWith => s.ends_with(arg.as_ref()),
                _ => s.contains(arg.as_ref()),
            })
        }
        F::Upper | F::Lower | F::Trim | F::ToChars | F::Length => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            match f {
                F::Upper => Ok(vec![Item::string(s.to_uppercase())]),
                F::Lower => Ok(vec![Item::string(s.to_lowercase())]),
                F::Trim => Ok(vec![Item::string(s.trim().to_string())]),
                F::Length => val(S::Integer(s.chars().count() as i64)),
                _ => Ok(s.chars().map(|c| Item::string(c.to_string())).collect()),
            }
        }
        F::Replace => {
            let Some(s) = single_string(&focus, "replace")? else {
                return Ok(Vec::new());
            };
            let (Some(pat), Some(rep)) = (
                single_string(&eval(&args[0], env, input)?, "replace")?,
                single_string(&eval(&args[1], env, input)?, "replace")?,
            ) else {
                return Ok(Vec::new());
            };
            let r = if pat.is_empty() {
                // Insert the replacement between every character, as the specification shows.
                let mut out = String::from(rep.as_ref());
                for c in s.chars() {
                    out.push(c);
                    out.push_str(&rep);
                }
                out
            } else {
                s.replace(pat.as_ref(), &rep)
            };
            Ok(vec![Item::string(r)])
        }
        F::Matches | F::MatchesFull | F::ReplaceMatches => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let owned;
            let re = match regex {
                Some(r) => r,
                None => {
                    let Some(p) = single_string(&eval(&args[0], env, input)?, f.name())? else {
                        return Ok(Vec::new());
                    };
                    let pat = if f == F::MatchesFull {
                        format!("^(?:{p})$")
                    } else {
                        format!("(?s:{p})")
                    };
                    owned = regex::Regex::new(&pat)
                        .map_err(|e| EvalError::ty(format!("invalid regex: {e}")))?;
                    &owned
                }
            };
            if f == F::ReplaceMatches {
                let Some(rep) = single_string(&eval(&args[1], env, input)?, f.name())? else {
                    return Ok(Vec::new());
                };
                return Ok(vec![Item::string(
                    re.replace_all(&s, rep.as_ref()).into_owned(),
                )]);
            }
            b(re.is_match(&s))
        }
        F::Split => {
            let Some(s) = single_string(&focus, "split")? else {
                return Ok(Vec::new());
            };
            let Some(sep) = single_string(&eval(&args[0], env, input)?, "split")? else {
                return Ok(Vec::new());
            };
            Ok(s.split(sep.as_ref())
                .map(|p| Item::string(p.to_string()))
                .collect())
        }
        F::Join => {
            let sep = match args.first() {
                Some(a) => single_string(&eval(a, env, input)?, "join")?.unwrap_or_default(),
                None => Cow::Borrowed(""),
            };
            if focus.is_empty() {
                return Ok(Vec::new());
            }
            let mut parts = Vec::new();
            for i in focus.iter().filter(|i| !valueless(i)) {
                match i.to_system() {
                    Some(S::String(s)) => parts.push(s.into_owned()),
                    _ => return Err(EvalError::ty("join(): expected Strings")),
                }
            }
            Ok(vec![Item::string(parts.join(&sep))])
        }
        F::Encode | F::Decode | F::Escape | F::Unescape => {
            let Some(s) = single_string(&focus, f.name())? else {
                return Ok(Vec::new());
            };
            let Some(fmt) = single_string(&eval(&args[0], env, input)?, f.name())? else {
                return Ok(Vec::new());
            };
            if f == F::Decode && fmt == "hex" && s.len() % 2 != 0 {
                return Err(EvalError::ty("decode('hex'): odd number of hex digits"));
            }
            Ok(crate::eval_strings::codec(f, &s, &fmt)
                .map(Item::string)
                .into_iter()
                .collect())
        }
        _ => Err(misrouted(f)),
    }
}
