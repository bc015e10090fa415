//! QAPI enums as Rust enums: [`qapi_enum!`] declares one with its wire names, and
//! [`QapiEnum`] lets tests check it against the schema's declaration.

/// A Rust enum standing for a QAPI enum of the schema.
pub trait QapiEnum: Sized + Copy + 'static {
    /// The schema's name for the enum (`MirrorSyncMode`).
    const NAME: &'static str;
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    /// The wire name of a value.
    fn as_str(self) -> &'static str;
    /// The value with wire name `s`.
    fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.as_str() == s)
    }
}

/// Whether the Rust enum `E` has exactly the values the schema declares for it, in order.
///
/// # Errors
/// What differs.
pub fn check_enum<E: QapiEnum>() -> Result<(), String> {
    let ours: Vec<&str> = E::ALL.iter().map(|v| v.as_str()).collect();
    let theirs = crate::schema().enum_values(E::NAME);
    if ours == theirs {
        Ok(())
    } else {
        Err(format!("{}: {ours:?} vs the schema's {theirs:?}", E::NAME))
    }
}

/// Declares a Rust enum for a QAPI enum: `qapi_enum! { /// doc  pub enum X "X" { A = "a", ... } }`.
#[macro_export]
macro_rules! qapi_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident $qapi:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $crate::QapiEnum for $name {
            const NAME: &'static str = $qapi;
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire),+
                }
            }
        }

        impl $name {
            /// The wire name.
            $vis fn as_str(self) -> &'static str {
                <Self as $crate::QapiEnum>::as_str(self)
            }

            /// The value with wire name `s`.
            #[allow(dead_code)]
            $vis fn parse(s: &str) -> Option<Self> {
                <Self as $crate::QapiEnum>::parse(s)
            }
        }
    };
}
