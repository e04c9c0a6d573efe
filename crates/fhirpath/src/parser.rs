//! Parser: tokens to a resolved expression tree (functions bound, arities checked).

use std::sync::Arc;

use rust_decimal::Decimal;

use crate::error::ParseError;
use crate::functions::Builtin;
use crate::lexer::{Tok, Token, tokenize};
use crate::quantity::{Quantity, calendar_unit};
use crate::registry::{CustomEntry, FunctionRegistry};
use crate::temporal::Temporal;
use crate::value::SystemValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    IntDiv,
    Mod,
    Add,
    Sub,
    Concat,
    Union,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Equiv,
    NotEq,
    NotEquiv,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

/// A type name in `is`, `as`, `ofType`: `Patient`, `FHIR.Patient`, `System.Integer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TypeSpec {
    pub namespace: Option<String>,
    pub name: String,
    /// FHIR types that are this type or derive from it, when few: type tests then compare names
    /// instead of walking the model.
    /// (Addresses of their entries in the type index, so a test is a pointer comparison.)
    pub subtypes: Option<Vec<usize>>,
    /// Whether primitive leaves can be of this type (false for complex FHIR types).
    pub matches_leaves: bool,
}

impl TypeSpec {
    pub(crate) fn new(namespace: Option<String>, name: String) -> Self {
        let subtypes = if namespace.as_deref() == Some("System") {
            None
        } else {
            let s = crate::typeinfo::subtypes_of(&name);
            (s.len() <= 16).then_some(s)
        };
        let complex_fhir = namespace.as_deref() != Some("System")
            && !SYSTEM_TYPES.contains(&name.as_str())
            && fhir_model::r4()
                .type_def(&name)
                .is_some_and(|t| t.kind != fhir_model::TypeKind::Primitive);
        TypeSpec {
            namespace,
            name,
            subtypes,
            matches_leaves: !complex_fhir,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Func {
    Builtin(Builtin),
    /// `is(T)`, `as(T)`, `ofType(T)`: the argument is a type, not an expression.
    TypeTest(Builtin, TypeSpec),
    Custom(Arc<CustomEntry>),
}

#[derive(Debug, Clone)]
pub(crate) enum Expr {
    Empty,
    Literal(SystemValue<'static>),
    This,
    Index,
    Total,
    Var(String),
    /// Member access; without a base it applies to the current focus (and may be a type filter).
    Member(Option<Box<Expr>>, String),
    Call {
        base: Option<Box<Expr>>,
        func: Func,
        args: Vec<Expr>,
        /// Precompiled regex when the pattern argument is a literal.
        regex: Option<Arc<regex::Regex>>,
    },
    Indexer(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Is(Box<Expr>, TypeSpec),
    As(Box<Expr>, TypeSpec),
}

/// A type-specifier argument of a custom function (`Patient`, `FHIR.Patient`) as the string literal
/// of its name; anything else unchanged.
fn type_arg_as_literal(arg: Expr) -> Expr {
    let name = match &arg {
        Expr::Member(None, n) => n.clone(),
        Expr::Member(Some(b), n) if matches!(b.as_ref(), Expr::Member(None, _)) => n.clone(),
        _ => return arg,
    };
    Expr::Literal(SystemValue::String(name.into()))
}

impl Expr {
    /// Names of the `%variables` this expression reads, in order of appearance (with repeats).
    pub(crate) fn collect_variables<'e>(&'e self, out: &mut Vec<&'e str>) {
        match self {
            Expr::Empty | Expr::Literal(_) | Expr::This | Expr::Index | Expr::Total => {}
            Expr::Var(n) => out.push(n),
            Expr::Member(base, _) => {
                if let Some(b) = base {
                    b.collect_variables(out);
                }
            }
            Expr::Call { base, args, .. } => {
                if let Some(b) = base {
                    b.collect_variables(out);
                }
                for a in args {
                    a.collect_variables(out);
                }
            }
            Expr::Indexer(a, b) | Expr::Binary(_, a, b) => {
                a.collect_variables(out);
                b.collect_variables(out);
            }
            Expr::Neg(a) | Expr::Is(a, _) | Expr::As(a, _) => a.collect_variables(out),
        }
    }
}

pub(crate) fn parse(src: &str, registry: &FunctionRegistry) -> Result<Expr, ParseError> {
    let toks = tokenize(src)?;
    let mut p = Parser {
        toks,
        i: 0,
        registry,
        depth: 0,
        links: 0,
    };
    let e = p.expr(0)?;
    let t = p.peek();
    if t.tok != Tok::Eof {
        return Err(ParseError::new(
            t.pos,
            "an operator or end of expression",
            &t.tok.describe(),
        ));
    }
    Ok(e)
}

struct Parser<'r, 's> {
    toks: Vec<Token<'s>>,
    i: usize,
    registry: &'r FunctionRegistry,
    /// Current recursion depth (parentheses, arguments, operands), and the operators and
    /// invocations seen so far (each chain link nests the tree one level): both capped so that
    /// parsing, evaluating and dropping an expression cannot exhaust the stack.
    depth: usize,
    links: usize,
}

const MAX_DEPTH: usize = 100;
const MAX_LINKS: usize = 300;

fn infix(tok: &Tok<'_>) -> Option<(u8, BinOp)> {
    Some(match tok {
        Tok::Star => (10, BinOp::Mul),
        Tok::Slash => (10, BinOp::Div),
        Tok::Plus => (9, BinOp::Add),
        Tok::Minus => (9, BinOp::Sub),
        Tok::Amp => (9, BinOp::Concat),
        Tok::Pipe => (7, BinOp::Union),
        Tok::Lt => (6, BinOp::Lt),
        Tok::Le => (6, BinOp::Le),
        Tok::Gt => (6, BinOp::Gt),
        Tok::Ge => (6, BinOp::Ge),
        Tok::Eq => (5, BinOp::Eq),
        Tok::Tilde => (5, BinOp::Equiv),
        Tok::NotEq => (5, BinOp::NotEq),
        Tok::NotTilde => (5, BinOp::NotEquiv),
        Tok::Ident(s) => match *s {
            "div" => (10, BinOp::IntDiv),
            "mod" => (10, BinOp::Mod),
            "in" => (4, BinOp::In),
            "contains" => (4, BinOp::Contains),
            "and" => (3, BinOp::And),
            "or" => (2, BinOp::Or),
            "xor" => (2, BinOp::Xor),
            "implies" => (1, BinOp::Implies),
            _ => return None,
        },
        _ => return None,
    })
}

const TYPE_BP: u8 = 8;
const UNARY_BP: u8 = 11;

impl<'s> Parser<'_, 's> {
    fn peek(&self) -> &Token<'s> {
        &self.toks[self.i.min(self.toks.len() - 1)]
    }

    /// Moves the current token out (the parser never looks back), except the final `Eof`.
    fn next(&mut self) -> Token<'s> {
        let last = self.toks.len() - 1;
        if self.i < last {
            let pos = self.toks[self.i].pos;
            let t = std::mem::replace(&mut self.toks[self.i], Token { tok: Tok::Eof, pos });
            self.i += 1;
            t
        } else {
            self.toks[last].clone()
        }
    }

    fn expect(&mut self, tok: Tok<'_>, what: &str) -> Result<(), ParseError> {
        let t = self.next();
        if t.tok == tok {
            Ok(())
        } else {
            Err(ParseError::new(t.pos, what, &t.tok.describe()))
        }
    }

    fn link(&mut self) -> Result<(), ParseError> {
        self.links += 1;
        if self.links > MAX_LINKS {
            let pos = self.peek().pos;
            return Err(ParseError::new(
                pos,
                &format!("an expression of at most {MAX_LINKS} operators and invocations"),
                "a larger expression",
            ));
        }
        Ok(())
    }

    fn nest(&mut self, by: usize) -> Result<(), ParseError> {
        self.depth += by;
        if self.depth > MAX_DEPTH {
            let pos = self.peek().pos;
            return Err(ParseError::new(
                pos,
                &format!("at most {MAX_DEPTH} levels of nesting"),
                "deeper nesting",
            ));
        }
        Ok(())
    }

    fn expr(&mut self, min_bp: u8) -> Result<Expr, ParseError> {
        self.nest(1)?;
        let r = self.expr_inner(min_bp);
        self.depth -= 1;
        r
    }

    fn expr_inner(&mut self, min_bp: u8) -> Result<Expr, ParseError> {
        let mut lhs = self.unary()?;
        loop {
            let t = self.peek();
            if let Tok::Ident(kw) = t.tok
                && (kw == "is" || kw == "as")
            {
                if TYPE_BP < min_bp {
                    break;
                }
                self.next();
                // Each nests the tree one level, as a binary operator does.
                self.link()?;
                let spec = self.type_spec()?;
                lhs = if kw == "is" {
                    Expr::Is(Box::new(lhs), spec)
                } else {
                    Expr::As(Box::new(lhs), spec)
                };
                continue;
            }
            let Some((bp, op)) = infix(&t.tok) else { break };
            if bp < min_bp {
                break;
            }
            self.next();
            self.link()?;
            let rhs = self.expr(bp + 1)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs));
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        match self.peek().tok {
            Tok::Minus => {
                self.next();
                let e = self.expr(UNARY_BP)?;
                Ok(match e {
                    Expr::Literal(SystemValue::Integer(i)) => {
                        Expr::Literal(SystemValue::Integer(-i))
                    }
                    Expr::Literal(SystemValue::Decimal(d)) => {
                        Expr::Literal(SystemValue::Decimal(-d))
                    }
                    Expr::Literal(SystemValue::Quantity(q)) => {
                        Expr::Literal(SystemValue::Quantity(Quantity::new(-q.value, q.unit)))
                    }
                    other => Expr::Neg(Box::new(other)),
                })
            }
            Tok::Plus => {
                self.next();
                self.expr(UNARY_BP)
            }
            _ => {
                let t = self.term()?;
                self.postfix(t)
            }
        }
    }

    fn postfix(&mut self, mut e: Expr) -> Result<Expr, ParseError> {
        loop {
            if matches!(self.peek().tok, Tok::Dot | Tok::LBracket) {
                self.link()?;
            }
            match self.peek().tok {
                Tok::Dot => {
                    self.next();
                    e = self.invocation(Some(Box::new(e)))?;
                }
                Tok::LBracket => {
                    self.next();
                    let idx = self.expr(0)?;
                    self.expect(Tok::RBracket, "']'")?;
                    e = Expr::Indexer(Box::new(e), Box::new(idx));
                }
                _ => return Ok(e),
            }
        }
    }

    fn identifier(&mut self) -> Result<(String, bool), ParseError> {
        let t = self.next();
        match t.tok {
            Tok::Ident(s) => Ok((s.to_string(), false)),
            Tok::Delimited(s) => Ok((s, true)),
            other => Err(ParseError::new(t.pos, "an identifier", &other.describe())),
        }
    }

    fn type_spec(&mut self) -> Result<TypeSpec, ParseError> {
        let pos = self.peek().pos;
        let spec = self.type_spec_raw()?;
        check_type(&spec, pos)?;
        Ok(spec)
    }

    fn type_spec_raw(&mut self) -> Result<TypeSpec, ParseError> {
        let (first, _) = self.identifier()?;
        if self.peek().tok == Tok::Dot
            && matches!(
                self.toks.get(self.i + 1).map(|t| &t.tok),
                Some(Tok::Ident(_) | Tok::Delimited(_))
            )
        {
            self.next();
            let (second, _) = self.identifier()?;
            return Ok(TypeSpec::new(Some(first), second));
        }
        Ok(TypeSpec::new(None, first))
    }

    /// identifier | function call | $this | $index | $total, after a '.' or at a term.
    fn invocation(&mut self, base: Option<Box<Expr>>) -> Result<Expr, ParseError> {
        let pos = self.peek().pos;
        match &self.peek().tok {
            &Tok::Dollar(d) => {
                self.next();
                let e = match d {
                    "this" => Expr::This,
                    "index" => Expr::Index,
                    "total" => Expr::Total,
                    _ => {
                        return Err(ParseError::new(
                            pos,
                            "$this, $index or $total",
                            &Tok::Dollar(d).describe(),
                        ));
                    }
                };
                // `a.$this` is `$this` evaluated on `a`'s items: equal to `a` itself.
                Ok(match (base, e) {
                    (Some(b), Expr::This) => *b,
                    (_, e) => e,
                })
            }
            Tok::Ident(_) | Tok::Delimited(_) => {
                let (name, delimited) = self.identifier()?;
                if !delimited && self.peek().tok == Tok::LParen {
                    self.next();
                    let mut args = Vec::new();
                    if self.peek().tok != Tok::RParen {
                        loop {
                            args.push(self.expr(0)?);
                            if self.peek().tok == Tok::Comma {
                                self.next();
                                continue;
                            }
                            break;
                        }
                    }
                    self.expect(Tok::RParen, "')' or ','")?;
                    return self.call(base, &name, args, pos);
                }
                Ok(Expr::Member(base, name))
            }
            other => Err(ParseError::new(
                pos,
                "an identifier or function",
                &other.describe(),
            )),
        }
    }

    fn call(
        &mut self,
        base: Option<Box<Expr>>,
        name: &str,
        args: Vec<Expr>,
        pos: usize,
    ) -> Result<Expr, ParseError> {
        if let Some(entry) = self.registry.get(name) {
            if args.len() < entry.min_args || args.len() > entry.max_args {
                return Err(ParseError::new(
                    pos,
                    &format!(
                        "{}..{} arguments for {name}()",
                        entry.min_args, entry.max_args
                    ),
                    &format!("{} arguments", args.len()),
                ));
            }
            let args = if entry.type_args {
                args.into_iter().map(type_arg_as_literal).collect()
            } else {
                args
            };
            return Ok(Expr::Call {
                base,
                func: Func::Custom(entry),
                args,
                regex: None,
            });
        }
        let Some((f, min, max)) = Builtin::lookup(name) else {
            return Err(ParseError::new(
                pos,
                "a known function",
                &format!("unknown function '{name}'"),
            ));
        };
        if args.len() < min || args.len() > max {
            return Err(ParseError::new(
                pos,
                &format!("{min}..{max} arguments for {name}()"),
                &format!("{} arguments", args.len()),
            ));
        }
        if matches!(f, Builtin::Is | Builtin::As | Builtin::OfType) {
            let spec = match &args[0] {
                Expr::Member(None, n) => TypeSpec::new(None, n.clone()),
                Expr::Member(Some(b), n) => match b.as_ref() {
                    Expr::Member(None, ns) => TypeSpec::new(Some(ns.clone()), n.clone()),
                    _ => return Err(ParseError::new(pos, "a type name", "an expression")),
                },
                _ => return Err(ParseError::new(pos, "a type name", "an expression")),
            };
            check_type(&spec, pos)?;
            return Ok(Expr::Call {
                base,
                func: Func::TypeTest(f, spec),
                args: Vec::new(),
                regex: None,
            });
        }
        let regex = match (f, args.first()) {
            (
                Builtin::Matches | Builtin::MatchesFull | Builtin::ReplaceMatches,
                Some(Expr::Literal(SystemValue::String(p))),
            ) => {
                let pat = if f == Builtin::MatchesFull {
                    format!("^(?:{p})$")
                } else {
                    format!("(?s:{p})")
                };
                match regex::Regex::new(&pat) {
                    Ok(r) => Some(Arc::new(r)),
                    Err(e) => {
                        return Err(ParseError::new(
                            pos,
                            "a valid regular expression",
                            &e.to_string(),
                        ));
                    }
                }
            }
            _ => None,
        };
        Ok(Expr::Call {
            base,
            func: Func::Builtin(f),
            args,
            regex,
        })
    }

    fn term(&mut self) -> Result<Expr, ParseError> {
        if let Tok::Str(_) = self.peek().tok
            && let Tok::Str(s) = self.next().tok
        {
            return Ok(Expr::Literal(SystemValue::String(s.into())));
        }
        let t = self.peek().clone();
        match &t.tok {
            Tok::Ident(s)
                if (*s == "true" || *s == "false")
                    && self.toks.get(self.i + 1).map(|t| &t.tok) != Some(&Tok::LParen) =>
            {
                self.next();
                Ok(Expr::Literal(SystemValue::Boolean(*s == "true")))
            }
            Tok::Ident(_) | Tok::Delimited(_) | Tok::Dollar(_) => self.invocation(None),
            Tok::Number(n) => {
                self.next();
                self.number(n, t.pos)
            }
            Tok::Long(n) => {
                self.next();
                let i = n
                    .parse::<i64>()
                    .map_err(|_| ParseError::new(t.pos, "a 64-bit integer", n))?;
                Ok(Expr::Literal(SystemValue::Integer(i)))
            }
            Tok::DateTime(s) => {
                self.next();
                let v = if s.contains('T') {
                    Temporal::parse_datetime(s).map(SystemValue::DateTime)
                } else {
                    Temporal::parse_date(s).map(SystemValue::Date)
                };
                v.map(Expr::Literal).ok_or_else(|| {
                    ParseError::new(t.pos, "a valid date or date-time", &format!("@{s}"))
                })
            }
            Tok::Time(s) => {
                self.next();
                Temporal::parse_time(s)
                    .map(|v| Expr::Literal(SystemValue::Time(v)))
                    .ok_or_else(|| ParseError::new(t.pos, "a valid time", &format!("@T{s}")))
            }
            Tok::Percent => {
                self.next();
                let n = self.next();
                match n.tok {
                    Tok::Ident(s) => Ok(Expr::Var(s.to_string())),
                    Tok::Delimited(s) | Tok::Str(s) => Ok(Expr::Var(s)),
                    other => Err(ParseError::new(n.pos, "a variable name", &other.describe())),
                }
            }
            Tok::LParen => {
                self.next();
                let e = self.expr(0)?;
                self.expect(Tok::RParen, "')'")?;
                Ok(e)
            }
            Tok::LBrace => {
                self.next();
                self.expect(Tok::RBrace, "'}'")?;
                Ok(Expr::Empty)
            }
            other => Err(ParseError::new(t.pos, "an expression", &other.describe())),
        }
    }

    fn number(&mut self, n: &str, pos: usize) -> Result<Expr, ParseError> {
        let unit = match &self.peek().tok {
            Tok::Str(u) => Some(u.clone()),
            Tok::Ident(w) => calendar_unit(w).map(str::to_string),
            _ => None,
        };
        if let Some(unit) = unit {
            self.next();
            let value: Decimal = n.parse().map_err(|_| ParseError::new(pos, "a number", n))?;
            return Ok(Expr::Literal(SystemValue::Quantity(Quantity::new(
                value, unit,
            ))));
        }
        if n.contains('.') {
            let d: Decimal = n
                .parse()
                .map_err(|_| ParseError::new(pos, "a decimal within range", n))?;
            Ok(Expr::Literal(SystemValue::Decimal(d)))
        } else {
            match n.parse::<i64>() {
                Ok(i) if i <= i64::from(i32::MAX) => Ok(Expr::Literal(SystemValue::Integer(i))),
                // FHIRPath Integer is 32-bit; larger literals are Decimals in practice.
                _ => {
                    let d: Decimal = n
                        .parse()
                        .map_err(|_| ParseError::new(pos, "a number within range", n))?;
                    Ok(Expr::Literal(SystemValue::Decimal(d)))
                }
            }
        }
    }
}

const SYSTEM_TYPES: [&str; 9] = [
    "Boolean", "String", "Integer", "Decimal", "Date", "DateTime", "Time", "Quantity", "Long",
];

/// A type name must exist in its namespace (FHIR R4 model or System).
fn check_type(spec: &TypeSpec, pos: usize) -> Result<(), ParseError> {
    let fhir = || fhir_model::r4().type_def(&spec.name).is_some();
    let system = || SYSTEM_TYPES.contains(&spec.name.as_str());
    let known = match spec.namespace.as_deref() {
        Some("FHIR") => fhir(),
        Some("System") => system(),
        None => fhir() || system(),
        Some(_) => false,
    };
    if known {
        Ok(())
    } else {
        let name = match &spec.namespace {
            Some(ns) => format!("{ns}.{}", spec.name),
            None => spec.name.clone(),
        };
        Err(ParseError::new(
            pos,
            "a FHIR or System type name",
            &format!("unknown type '{name}'"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Expr, ParseError> {
        parse(s, &FunctionRegistry::new())
    }

    #[test]
    fn precedence() {
        let e = p("1 + 2 * 3 = 7 and true").unwrap();
        assert!(matches!(e, Expr::Binary(BinOp::And, _, _)));
        let e = p("Observation.value is Quantity").unwrap();
        assert!(matches!(e, Expr::Is(_, _)));
        let e = p("a | b is Quantity").unwrap();
        assert!(matches!(e, Expr::Binary(BinOp::Union, _, _)));
    }

    #[test]
    fn errors_have_positions() {
        let err = p("Patient.name.where(").unwrap_err();
        assert_eq!(err.position, 19);
        assert!(p("2 + 2 /").is_err());
        assert!(p("Patient.foo(").is_err());
        assert!(p("Patient.unknownFn()").is_err());
        assert!(p("1 2").is_err());
    }

    #[test]
    fn nesting_is_bounded() {
        assert!(p(&"(".repeat(10_000)).is_err());
        assert!(p("a.".repeat(10_000).trim_end_matches('.')).is_err());
        assert!(p(&vec!["1"; 10_000].join(" + ")).is_err());
        assert!(p(&vec!["1"; 50].join(" + ")).is_ok());
        // The largest accepted expression evaluates on a small stack.
        let big = vec!["true"; 150].join(" and ") + &".not()".repeat(140);
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let e = crate::Expression::compile(&big).unwrap();
                let v = serde_json::json!({});
                e.evaluate(&crate::EvalContext::new(&v)).is_ok()
            })
            .unwrap();
        assert!(handle.join().unwrap());
    }

    #[test]
    fn literals() {
        assert!(matches!(
            p("4 days").unwrap(),
            Expr::Literal(SystemValue::Quantity(_))
        ));
        assert!(matches!(
            p("@2015-02-04T14:34:28Z").unwrap(),
            Expr::Literal(SystemValue::DateTime(_))
        ));
        assert!(matches!(
            p("@T14:34").unwrap(),
            Expr::Literal(SystemValue::Time(_))
        ));
        assert!(matches!(
            p("-5").unwrap(),
            Expr::Literal(SystemValue::Integer(-5))
        ));
    }
}
