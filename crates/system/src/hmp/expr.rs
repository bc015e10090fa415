//! The human monitor's integer expressions (QEMU's `get_expr`), what its `i` and `l`
//! arguments take: numbers in C's notations (`16`, `0x10`, `020`), unary `+ - ~`,
//! `* / %`, `& | ^` and `+ -`, and parentheses. An expression ends at the first thing that
//! cannot continue it (`1 2` is `1`, then `2`). Arithmetic wraps, as on QEMU's 64-bit
//! integers. The machine has no processor registers, so `$NAME` names none.

/// An expression read from the front of a line: its value and what follows it.
pub(crate) type Read<'a> = (i64, &'a str);

/// Reads an expression from the front of `text`.
///
/// # Errors
/// QEMU's texts: "unexpected end of expression", "invalid char 'x' in expression",
/// "number too large", "')' expected", "division by zero", "unknown register".
pub(crate) fn read(text: &str) -> Result<Read<'_>, String> {
    sum(text.trim_start())
}

fn skip(text: &str) -> &str {
    text.trim_start()
}

/// One level of binary operators: operands read by `operand`, joined left to right by
/// any of `ops` as `apply` says.
fn level<'a>(
    text: &'a str,
    ops: &[char],
    operand: fn(&str) -> Result<Read<'_>, String>,
    apply: fn(char, i64, i64) -> Result<i64, String>,
) -> Result<Read<'a>, String> {
    let (mut value, mut rest) = operand(text)?;
    while let Some(op) = rest.chars().next().filter(|c| ops.contains(c)) {
        let (rhs, tail) = operand(skip(&rest[1..]))?;
        value = apply(op, value, rhs)?;
        rest = tail;
    }
    Ok((value, rest))
}

/// `a + b`, `a - b`: the loosest operators.
fn sum(text: &str) -> Result<Read<'_>, String> {
    level(text, &['+', '-'], product, |op, a, b| {
        Ok(if op == '+' {
            a.wrapping_add(b)
        } else {
            a.wrapping_sub(b)
        })
    })
}

/// `a * b`, `a / b`, `a % b`.
fn product(text: &str) -> Result<Read<'_>, String> {
    level(text, &['*', '/', '%'], logic, |op, a, b| match op {
        '*' => Ok(a.wrapping_mul(b)),
        _ if b == 0 => Err("division by zero".into()),
        '/' => Ok(a.wrapping_div(b)),
        _ => Ok(a.wrapping_rem(b)),
    })
}

/// `a & b`, `a | b`, `a ^ b`: the tightest binary operators, as QEMU's monitor has them.
fn logic(text: &str) -> Result<Read<'_>, String> {
    level(text, &['&', '|', '^'], unary, |op, a, b| {
        Ok(match op {
            '&' => a & b,
            '|' => a | b,
            _ => a ^ b,
        })
    })
}

fn unary(text: &str) -> Result<Read<'_>, String> {
    let Some(first) = text.chars().next() else {
        return Err("unexpected end of expression".into());
    };
    match first {
        '+' => unary(skip(&text[1..])),
        '-' => unary(skip(&text[1..])).map(|(v, rest)| (v.wrapping_neg(), rest)),
        '~' => unary(skip(&text[1..])).map(|(v, rest)| (!v, rest)),
        '(' => {
            let (value, rest) = sum(skip(&text[1..]))?;
            match rest.strip_prefix(')') {
                Some(tail) => Ok((value, skip(tail))),
                None => Err("')' expected".into()),
            }
        }
        '$' => Err("unknown register".into()),
        _ => number(text).map(|(v, rest)| (v, skip(rest))),
    }
}

/// A number as C's `strtoull(.., 0)` reads it: `0x` hexadecimal, a leading `0` octal,
/// else decimal.
fn number(text: &str) -> Result<Read<'_>, String> {
    let (radix, digits_at) = if (text.starts_with("0x") || text.starts_with("0X"))
        && text[2..].starts_with(|c: char| c.is_ascii_hexdigit())
    {
        (16, 2)
    } else if text.starts_with('0') {
        (8, 0)
    } else {
        (10, 0)
    };
    let body = &text[digits_at..];
    let len = body
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(body.len());
    if len == 0 {
        let c = text.chars().next().unwrap_or('\0');
        return Err(format!("invalid char '{c}' in expression"));
    }
    let value =
        u64::from_str_radix(&body[..len], radix).map_err(|_| "number too large".to_owned())?;
    Ok((value as i64, &body[len..]))
}

#[cfg(test)]
mod tests {
    use super::read;

    #[test]
    fn numbers_and_operators_as_qemus_monitor() {
        assert_eq!(read("0x10 0"), Ok((16, "0")));
        assert_eq!(read("010"), Ok((8, "")));
        assert_eq!(read("1+2*3"), Ok((7, "")));
        assert_eq!(read("(1 + 2) * 3 rest"), Ok((9, "rest")));
        assert_eq!(read("-1"), Ok((-1, "")));
        assert_eq!(read("6 & 3 | 8"), Ok((10, "")));
        assert_eq!(read("18446744073709551615"), Ok((-1, "")));
    }

    #[test]
    fn what_is_no_expression_is_named() {
        assert_eq!(read("").unwrap_err(), "unexpected end of expression");
        assert_eq!(read("x").unwrap_err(), "invalid char 'x' in expression");
        assert_eq!(
            read("99999999999999999999").unwrap_err(),
            "number too large"
        );
        assert_eq!(read("(1").unwrap_err(), "')' expected");
        assert_eq!(read("1/0").unwrap_err(), "division by zero");
        assert_eq!(read("1 +").unwrap_err(), "unexpected end of expression");
    }
}
