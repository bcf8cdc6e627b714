//! Pure NEWS2 scoring (Royal College of Physicians, National Early Warning
//! Score 2, 2017 chart).
//!
//! This module knows nothing about Extism, JSON or FHIR: it maps validated
//! vital signs to per-parameter sub-scores, the aggregate score and the
//! clinical risk band.
//!
//! Band rule for real-valued inputs: the chart is printed on integers (or on
//! tenths for temperature) with inclusive boundaries. Each band is defined by
//! its *upper* bound, `value <= upper`, so a value that falls between two chart
//! values belongs to the next (higher) band: a respiration rate of 8.5 /min
//! scores as 9–11, a temperature of 35.05 °C scores as 35.1–36.0.

use std::fmt;

/// Lowest and highest value accepted for each measurement, inclusive.
/// Anything outside is rejected as physiologically impossible (or, for
/// temperature, as a likely Fahrenheit reading) rather than scored.
pub mod limits {
    /// Respiration rate, breaths per minute.
    pub const RESPIRATORY_RATE: (u16, u16) = (0, 120);
    /// Peripheral oxygen saturation, percent.
    pub const SPO2: (u16, u16) = (0, 100);
    /// Systolic blood pressure, mmHg.
    pub const SYSTOLIC_BP: (u16, u16) = (0, 400);
    /// Pulse, beats per minute.
    pub const PULSE: (u16, u16) = (0, 500);
    /// Body temperature, degrees Celsius.
    pub const TEMPERATURE: (u16, u16) = (10, 50);
}

/// Which SpO2 scoring scale applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spo2Scale {
    /// Scale 1: the default for all patients.
    Scale1,
    /// Scale 2: patients with hypercapnic respiratory failure and a
    /// prescribed target saturation of 88–92 %.
    Scale2,
}

impl Spo2Scale {
    /// The chart number of the scale (1 or 2).
    pub fn number(self) -> u8 {
        match self {
            Spo2Scale::Scale1 => 1,
            Spo2Scale::Scale2 => 2,
        }
    }

    /// The scale for a chart number, `None` for anything but 1 or 2.
    pub fn from_number(n: u64) -> Option<Self> {
        match n {
            1 => Some(Spo2Scale::Scale1),
            2 => Some(Spo2Scale::Scale2),
            _ => None,
        }
    }
}

/// Level of consciousness on the ACVPU scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consciousness {
    Alert,
    /// New confusion (or new disorientation / agitation).
    Confusion,
    Voice,
    Pain,
    Unresponsive,
}

impl Consciousness {
    /// Parses the one-letter ACVPU code ("A", "C", "V", "P", "U").
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "A" => Some(Consciousness::Alert),
            "C" => Some(Consciousness::Confusion),
            "V" => Some(Consciousness::Voice),
            "P" => Some(Consciousness::Pain),
            "U" => Some(Consciousness::Unresponsive),
            _ => None,
        }
    }

    /// The one-letter ACVPU code.
    pub fn code(self) -> &'static str {
        match self {
            Consciousness::Alert => "A",
            Consciousness::Confusion => "C",
            Consciousness::Voice => "V",
            Consciousness::Pain => "P",
            Consciousness::Unresponsive => "U",
        }
    }
}

/// One set of observations, in chart units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vitals {
    /// Breaths per minute.
    pub respiratory_rate: f64,
    /// Percent.
    pub spo2: f64,
    pub spo2_scale: Spo2Scale,
    /// `true` when the patient is on supplemental oxygen, `false` on air.
    pub on_oxygen: bool,
    /// mmHg.
    pub systolic_bp: f64,
    /// Beats per minute.
    pub pulse: f64,
    pub consciousness: Consciousness,
    /// Degrees Celsius.
    pub temperature: f64,
}

/// A rejected measurement: `field` is the input field name.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreError {
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for ScoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.reason)
    }
}

impl std::error::Error for ScoreError {}

/// Per-parameter sub-scores, each 0..=3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubScores {
    pub respiratory_rate: u8,
    pub spo2: u8,
    pub air_or_oxygen: u8,
    pub systolic_bp: u8,
    pub pulse: u8,
    pub consciousness: u8,
    pub temperature: u8,
}

impl SubScores {
    /// The sub-scores with stable names, in chart order.
    pub fn named(&self) -> [(&'static str, u8); 7] {
        [
            ("respiratory_rate", self.respiratory_rate),
            ("spo2", self.spo2),
            ("air_or_oxygen", self.air_or_oxygen),
            ("systolic_bp", self.systolic_bp),
            ("pulse", self.pulse),
            ("consciousness", self.consciousness),
            ("temperature", self.temperature),
        ]
    }

    /// Aggregate NEWS2 score (0..=20).
    pub fn aggregate(&self) -> u8 {
        self.named().iter().map(|&(_, s)| s).sum()
    }

    /// Whether any single parameter scores 3 (a "red score").
    pub fn any_red(&self) -> bool {
        self.named().iter().any(|&(_, s)| s == 3)
    }
}

/// NEWS2 clinical risk band.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RiskBand {
    /// Aggregate 0–4 with no single parameter scoring 3.
    Low,
    /// Aggregate 0–4 with a single parameter scoring 3.
    LowMedium,
    /// Aggregate 5–6.
    Medium,
    /// Aggregate 7 or more.
    High,
}

impl RiskBand {
    /// The band for an aggregate score and the red-score flag.
    pub fn from_aggregate(aggregate: u8, any_red: bool) -> Self {
        match aggregate {
            7.. => RiskBand::High,
            5..=6 => RiskBand::Medium,
            _ if any_red => RiskBand::LowMedium,
            _ => RiskBand::Low,
        }
    }

    /// The band as written on the RCP chart: "low", "low-medium", "medium"
    /// or "high".
    pub fn as_str(self) -> &'static str {
        match self {
            RiskBand::Low => "low",
            RiskBand::LowMedium => "low-medium",
            RiskBand::Medium => "medium",
            RiskBand::High => "high",
        }
    }
}

/// The result of scoring one set of observations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    pub sub_scores: SubScores,
    pub aggregate: u8,
    pub risk: RiskBand,
}

/// Respiration rate (/min): <=8 → 3; 9–11 → 1; 12–20 → 0; 21–24 → 2; >=25 → 3.
pub fn respiratory_rate_score(rate: f64) -> u8 {
    if rate <= 8.0 {
        3
    } else if rate <= 11.0 {
        1
    } else if rate <= 20.0 {
        0
    } else if rate <= 24.0 {
        2
    } else {
        3
    }
}

/// SpO2 Scale 1 (%): <=91 → 3; 92–93 → 2; 94–95 → 1; >=96 → 0.
pub fn spo2_scale1_score(spo2: f64) -> u8 {
    if spo2 <= 91.0 {
        3
    } else if spo2 <= 93.0 {
        2
    } else if spo2 <= 95.0 {
        1
    } else {
        0
    }
}

/// SpO2 Scale 2 (%): <=83 → 3; 84–85 → 2; 86–87 → 1; 88–92 → 0;
/// >=93 on air → 0; 93–94 on oxygen → 1; 95–96 on oxygen → 2;
/// >=97 on oxygen → 3.
pub fn spo2_scale2_score(spo2: f64, on_oxygen: bool) -> u8 {
    if spo2 <= 83.0 {
        3
    } else if spo2 <= 85.0 {
        2
    } else if spo2 <= 87.0 {
        1
    } else if spo2 <= 92.0 || !on_oxygen {
        0
    } else if spo2 <= 94.0 {
        1
    } else if spo2 <= 96.0 {
        2
    } else {
        3
    }
}

/// Air or oxygen: supplemental oxygen → 2; air → 0.
pub fn air_or_oxygen_score(on_oxygen: bool) -> u8 {
    if on_oxygen { 2 } else { 0 }
}

/// Systolic BP (mmHg): <=90 → 3; 91–100 → 2; 101–110 → 1; 111–219 → 0;
/// >=220 → 3.
pub fn systolic_bp_score(sbp: f64) -> u8 {
    if sbp <= 90.0 {
        3
    } else if sbp <= 100.0 {
        2
    } else if sbp <= 110.0 {
        1
    } else if sbp <= 219.0 {
        0
    } else {
        3
    }
}

/// Pulse (/min): <=40 → 3; 41–50 → 1; 51–90 → 0; 91–110 → 1; 111–130 → 2;
/// >=131 → 3.
pub fn pulse_score(pulse: f64) -> u8 {
    if pulse <= 40.0 {
        3
    } else if pulse <= 50.0 {
        1
    } else if pulse <= 90.0 {
        0
    } else if pulse <= 110.0 {
        1
    } else if pulse <= 130.0 {
        2
    } else {
        3
    }
}

/// Consciousness: Alert → 0; new Confusion, Voice, Pain, Unresponsive → 3.
pub fn consciousness_score(level: Consciousness) -> u8 {
    match level {
        Consciousness::Alert => 0,
        Consciousness::Confusion
        | Consciousness::Voice
        | Consciousness::Pain
        | Consciousness::Unresponsive => 3,
    }
}

/// Temperature (°C): <=35.0 → 3; 35.1–36.0 → 1; 36.1–38.0 → 0;
/// 38.1–39.0 → 1; >=39.1 → 2.
pub fn temperature_score(celsius: f64) -> u8 {
    if celsius <= 35.0 {
        3
    } else if celsius <= 36.0 {
        1
    } else if celsius <= 38.0 {
        0
    } else if celsius <= 39.0 {
        1
    } else {
        2
    }
}

/// Checks that `value` is finite and within `(min, max)` inclusive.
fn check(
    field: &'static str,
    value: f64,
    (min, max): (u16, u16),
    unit: &str,
) -> Result<(), ScoreError> {
    if !value.is_finite() {
        return Err(ScoreError {
            field,
            reason: "must be a finite number".to_string(),
        });
    }
    if value < f64::from(min) || value > f64::from(max) {
        return Err(ScoreError {
            field,
            reason: format!("must be between {min} and {max} {unit}, got {value}"),
        });
    }
    Ok(())
}

/// Validates every measurement, in input order; the first bad field wins.
pub fn validate(v: &Vitals) -> Result<(), ScoreError> {
    check(
        "respiratory_rate",
        v.respiratory_rate,
        limits::RESPIRATORY_RATE,
        "/min",
    )?;
    check("spo2", v.spo2, limits::SPO2, "%")?;
    check("systolic_bp", v.systolic_bp, limits::SYSTOLIC_BP, "mmHg")?;
    check("pulse", v.pulse, limits::PULSE, "/min")?;
    check(
        "temperature",
        v.temperature,
        limits::TEMPERATURE,
        "degrees celsius",
    )?;
    Ok(())
}

/// Validates and scores one set of observations.
pub fn score(v: &Vitals) -> Result<Assessment, ScoreError> {
    validate(v)?;
    let spo2 = match v.spo2_scale {
        Spo2Scale::Scale1 => spo2_scale1_score(v.spo2),
        Spo2Scale::Scale2 => spo2_scale2_score(v.spo2, v.on_oxygen),
    };
    let sub_scores = SubScores {
        respiratory_rate: respiratory_rate_score(v.respiratory_rate),
        spo2,
        air_or_oxygen: air_or_oxygen_score(v.on_oxygen),
        systolic_bp: systolic_bp_score(v.systolic_bp),
        pulse: pulse_score(v.pulse),
        consciousness: consciousness_score(v.consciousness),
        temperature: temperature_score(v.temperature),
    };
    let aggregate = sub_scores.aggregate();
    Ok(Assessment {
        sub_scores,
        aggregate,
        risk: RiskBand::from_aggregate(aggregate, sub_scores.any_red()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overwrites one measurement of a `Vitals`.
    type Setter = fn(&mut Vitals, f64);

    /// A patient who scores 0 on every parameter.
    fn normal() -> Vitals {
        Vitals {
            respiratory_rate: 16.0,
            spo2: 97.0,
            spo2_scale: Spo2Scale::Scale1,
            on_oxygen: false,
            systolic_bp: 120.0,
            pulse: 70.0,
            consciousness: Consciousness::Alert,
            temperature: 37.0,
        }
    }

    /// Asserts `f(value) == expected` for every `(value, expected)` pair.
    fn table(name: &str, f: impl Fn(f64) -> u8, cases: &[(f64, u8)]) {
        for &(value, expected) in cases {
            assert_eq!(f(value), expected, "{name}({value})");
        }
    }

    #[test]
    fn respiratory_rate_boundaries() {
        table(
            "respiratory_rate",
            respiratory_rate_score,
            &[
                (0.0, 3),
                (8.0, 3),
                (9.0, 1),
                (11.0, 1),
                (12.0, 0),
                (20.0, 0),
                (21.0, 2),
                (24.0, 2),
                (25.0, 3),
                (60.0, 3),
            ],
        );
    }

    #[test]
    fn respiratory_rate_between_chart_values_takes_next_band() {
        table(
            "respiratory_rate",
            respiratory_rate_score,
            &[(8.5, 1), (11.5, 0), (20.5, 2), (24.5, 3)],
        );
    }

    #[test]
    fn spo2_scale1_boundaries() {
        table(
            "spo2_scale1",
            spo2_scale1_score,
            &[
                (0.0, 3),
                (91.0, 3),
                (92.0, 2),
                (93.0, 2),
                (94.0, 1),
                (95.0, 1),
                (96.0, 0),
                (100.0, 0),
            ],
        );
        table(
            "spo2_scale1",
            spo2_scale1_score,
            &[(91.5, 2), (93.5, 1), (95.5, 0)],
        );
    }

    #[test]
    fn spo2_scale2_on_air_boundaries() {
        table(
            "spo2_scale2_air",
            |s| spo2_scale2_score(s, false),
            &[
                (0.0, 3),
                (83.0, 3),
                (84.0, 2),
                (85.0, 2),
                (86.0, 1),
                (87.0, 1),
                (88.0, 0),
                (92.0, 0),
                (93.0, 0),
                (94.0, 0),
                (95.0, 0),
                (96.0, 0),
                (97.0, 0),
                (100.0, 0),
            ],
        );
    }

    #[test]
    fn spo2_scale2_on_oxygen_boundaries() {
        table(
            "spo2_scale2_oxygen",
            |s| spo2_scale2_score(s, true),
            &[
                (0.0, 3),
                (83.0, 3),
                (84.0, 2),
                (85.0, 2),
                (86.0, 1),
                (87.0, 1),
                (88.0, 0),
                (92.0, 0),
                (93.0, 1),
                (94.0, 1),
                (95.0, 2),
                (96.0, 2),
                (97.0, 3),
                (100.0, 3),
            ],
        );
        table(
            "spo2_scale2_oxygen",
            |s| spo2_scale2_score(s, true),
            &[
                (83.5, 2),
                (85.5, 1),
                (87.5, 0),
                (92.5, 1),
                (94.5, 2),
                (96.5, 3),
            ],
        );
    }

    #[test]
    fn air_or_oxygen() {
        assert_eq!(air_or_oxygen_score(false), 0);
        assert_eq!(air_or_oxygen_score(true), 2);
    }

    #[test]
    fn systolic_bp_boundaries() {
        table(
            "systolic_bp",
            systolic_bp_score,
            &[
                (0.0, 3),
                (90.0, 3),
                (91.0, 2),
                (100.0, 2),
                (101.0, 1),
                (110.0, 1),
                (111.0, 0),
                (219.0, 0),
                (220.0, 3),
                (300.0, 3),
            ],
        );
        table(
            "systolic_bp",
            systolic_bp_score,
            &[(90.5, 2), (100.5, 1), (110.5, 0), (219.5, 3)],
        );
    }

    #[test]
    fn pulse_boundaries() {
        table(
            "pulse",
            pulse_score,
            &[
                (0.0, 3),
                (40.0, 3),
                (41.0, 1),
                (50.0, 1),
                (51.0, 0),
                (90.0, 0),
                (91.0, 1),
                (110.0, 1),
                (111.0, 2),
                (130.0, 2),
                (131.0, 3),
                (200.0, 3),
            ],
        );
        table(
            "pulse",
            pulse_score,
            &[(40.5, 1), (50.5, 0), (90.5, 1), (110.5, 2), (130.5, 3)],
        );
    }

    #[test]
    fn consciousness_levels() {
        assert_eq!(consciousness_score(Consciousness::Alert), 0);
        for level in [
            Consciousness::Confusion,
            Consciousness::Voice,
            Consciousness::Pain,
            Consciousness::Unresponsive,
        ] {
            assert_eq!(consciousness_score(level), 3, "{level:?}");
        }
    }

    #[test]
    fn consciousness_codes_round_trip() {
        for code in ["A", "C", "V", "P", "U"] {
            let level = Consciousness::from_code(code).expect("known code");
            assert_eq!(level.code(), code);
        }
        for bad in ["", "a", "alert", "X", "AV"] {
            assert_eq!(Consciousness::from_code(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn temperature_boundaries() {
        table(
            "temperature",
            temperature_score,
            &[
                (10.0, 3),
                (35.0, 3),
                (35.1, 1),
                (36.0, 1),
                (36.1, 0),
                (38.0, 0),
                (38.1, 1),
                (39.0, 1),
                (39.1, 2),
                (42.0, 2),
            ],
        );
        table(
            "temperature",
            temperature_score,
            &[(35.05, 1), (36.05, 0), (38.05, 1), (39.05, 2)],
        );
    }

    #[test]
    fn spo2_scale_numbers() {
        assert_eq!(Spo2Scale::from_number(1), Some(Spo2Scale::Scale1));
        assert_eq!(Spo2Scale::from_number(2), Some(Spo2Scale::Scale2));
        assert_eq!(Spo2Scale::from_number(0), None);
        assert_eq!(Spo2Scale::from_number(3), None);
        assert_eq!(Spo2Scale::Scale1.number(), 1);
        assert_eq!(Spo2Scale::Scale2.number(), 2);
    }

    #[test]
    fn normal_observations_score_zero_low() {
        let a = score(&normal()).expect("valid");
        assert_eq!(a.aggregate, 0);
        assert_eq!(a.risk, RiskBand::Low);
        assert_eq!(a.sub_scores.named().iter().map(|&(_, s)| s).sum::<u8>(), 0);
    }

    #[test]
    fn score_uses_the_selected_spo2_scale() {
        let scale1 = Vitals {
            spo2: 90.0,
            ..normal()
        };
        assert_eq!(score(&scale1).expect("valid").sub_scores.spo2, 3);
        let scale2 = Vitals {
            spo2_scale: Spo2Scale::Scale2,
            ..scale1
        };
        assert_eq!(score(&scale2).expect("valid").sub_scores.spo2, 0);

        // Scale 2 at 97 %: 0 on air, 3 on oxygen (plus 2 for the oxygen).
        let air = Vitals {
            spo2: 97.0,
            spo2_scale: Spo2Scale::Scale2,
            ..normal()
        };
        let a = score(&air).expect("valid");
        assert_eq!(
            (a.sub_scores.spo2, a.sub_scores.air_or_oxygen, a.aggregate),
            (0, 0, 0)
        );
        let oxygen = Vitals {
            on_oxygen: true,
            ..air
        };
        let a = score(&oxygen).expect("valid");
        assert_eq!(
            (a.sub_scores.spo2, a.sub_scores.air_or_oxygen, a.aggregate),
            (3, 2, 5)
        );
        assert_eq!(a.risk, RiskBand::Medium);
    }

    #[test]
    fn aggregate_is_the_sum_of_sub_scores() {
        let v = Vitals {
            respiratory_rate: 22.0, // 2
            spo2: 93.0,             // 2 (scale 1)
            spo2_scale: Spo2Scale::Scale1,
            on_oxygen: true,                     // 2
            systolic_bp: 105.0,                  // 1
            pulse: 115.0,                        // 2
            consciousness: Consciousness::Alert, // 0
            temperature: 38.5,                   // 1
        };
        let a = score(&v).expect("valid");
        assert_eq!(
            a.sub_scores,
            SubScores {
                respiratory_rate: 2,
                spo2: 2,
                air_or_oxygen: 2,
                systolic_bp: 1,
                pulse: 2,
                consciousness: 0,
                temperature: 1,
            }
        );
        assert_eq!(a.aggregate, 10);
        assert_eq!(a.risk, RiskBand::High);
    }

    #[test]
    fn maximum_aggregate_is_twenty() {
        let v = Vitals {
            respiratory_rate: 30.0,
            spo2: 80.0,
            spo2_scale: Spo2Scale::Scale1,
            on_oxygen: true,
            systolic_bp: 80.0,
            pulse: 150.0,
            consciousness: Consciousness::Unresponsive,
            temperature: 34.0,
        };
        let a = score(&v).expect("valid");
        assert_eq!(a.aggregate, 20);
        assert_eq!(a.risk, RiskBand::High);
    }

    #[test]
    fn risk_band_thresholds() {
        for aggregate in 0..=4 {
            assert_eq!(RiskBand::from_aggregate(aggregate, false), RiskBand::Low);
        }
        for aggregate in 3..=4 {
            assert_eq!(
                RiskBand::from_aggregate(aggregate, true),
                RiskBand::LowMedium
            );
        }
        for red in [false, true] {
            assert_eq!(RiskBand::from_aggregate(5, red), RiskBand::Medium);
            assert_eq!(RiskBand::from_aggregate(6, red), RiskBand::Medium);
            assert_eq!(RiskBand::from_aggregate(7, red), RiskBand::High);
            assert_eq!(RiskBand::from_aggregate(20, red), RiskBand::High);
        }
        assert_eq!(RiskBand::Low.as_str(), "low");
        assert_eq!(RiskBand::LowMedium.as_str(), "low-medium");
        assert_eq!(RiskBand::Medium.as_str(), "medium");
        assert_eq!(RiskBand::High.as_str(), "high");
    }

    #[test]
    fn risk_bands_from_observations() {
        // Aggregate 4, no red score: low.
        let low = Vitals {
            respiratory_rate: 22.0,
            pulse: 100.0,
            temperature: 38.5,
            ..normal()
        };
        let a = score(&low).expect("valid");
        assert_eq!(
            (a.aggregate, a.sub_scores.any_red(), a.risk),
            (4, false, RiskBand::Low)
        );

        // Aggregate 3 from a single red parameter: low-medium.
        let red = Vitals {
            consciousness: Consciousness::Confusion,
            ..normal()
        };
        let a = score(&red).expect("valid");
        assert_eq!((a.aggregate, a.risk), (3, RiskBand::LowMedium));

        // Each parameter that can score 3 on its own triggers low-medium.
        for v in [
            Vitals {
                respiratory_rate: 8.0,
                ..normal()
            },
            Vitals {
                spo2: 91.0,
                ..normal()
            },
            Vitals {
                systolic_bp: 90.0,
                ..normal()
            },
            Vitals {
                pulse: 131.0,
                ..normal()
            },
            Vitals {
                temperature: 35.0,
                ..normal()
            },
        ] {
            let a = score(&v).expect("valid");
            assert_eq!((a.aggregate, a.risk), (3, RiskBand::LowMedium), "{v:?}");
        }

        // Red score plus one more point: still low-medium at 4.
        let red4 = Vitals { pulse: 95.0, ..red };
        let a = score(&red4).expect("valid");
        assert_eq!((a.aggregate, a.risk), (4, RiskBand::LowMedium));

        // Aggregate 5 with a red score: medium takes precedence.
        let medium = Vitals {
            on_oxygen: true,
            ..red
        };
        let a = score(&medium).expect("valid");
        assert_eq!((a.aggregate, a.risk), (5, RiskBand::Medium));

        // Aggregate 6: medium.
        let six = Vitals {
            pulse: 95.0,
            ..medium
        };
        let a = score(&six).expect("valid");
        assert_eq!((a.aggregate, a.risk), (6, RiskBand::Medium));

        // Aggregate 7: high.
        let high = Vitals {
            temperature: 38.5,
            ..six
        };
        let a = score(&high).expect("valid");
        assert_eq!((a.aggregate, a.risk), (7, RiskBand::High));
    }

    #[test]
    fn rejects_non_finite_values_naming_the_field() {
        let cases: [(&str, Setter); 5] = [
            ("respiratory_rate", |v, x| v.respiratory_rate = x),
            ("spo2", |v, x| v.spo2 = x),
            ("systolic_bp", |v, x| v.systolic_bp = x),
            ("pulse", |v, x| v.pulse = x),
            ("temperature", |v, x| v.temperature = x),
        ];
        for (field, set) in cases {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let mut v = normal();
                set(&mut v, bad);
                let err = score(&v).expect_err("must reject");
                assert_eq!(err.field, field);
                assert_eq!(err.to_string(), format!("{field} must be a finite number"));
            }
        }
    }

    #[test]
    fn rejects_impossible_values_naming_the_field() {
        let cases: [(&str, Setter, &[f64]); 5] = [
            (
                "respiratory_rate",
                |v, x| v.respiratory_rate = x,
                &[-1.0, -0.1, 120.5, 1000.0],
            ),
            ("spo2", |v, x| v.spo2 = x, &[-1.0, 100.1, 101.0]),
            ("systolic_bp", |v, x| v.systolic_bp = x, &[-5.0, 400.5]),
            ("pulse", |v, x| v.pulse = x, &[-1.0, 501.0]),
            // 98.6 is a Fahrenheit reading.
            (
                "temperature",
                |v, x| v.temperature = x,
                &[-37.0, 0.0, 9.9, 50.1, 98.6],
            ),
        ];
        for (field, set, values) in cases {
            for &bad in values {
                let mut v = normal();
                set(&mut v, bad);
                let err = score(&v).expect_err("must reject");
                assert_eq!(err.field, field, "{bad}");
                let msg = err.to_string();
                assert!(
                    msg.starts_with(&format!("{field} must be between ")),
                    "{msg}"
                );
                assert!(msg.ends_with(&format!("got {bad}")), "{msg}");
                assert!(msg.starts_with(char::is_lowercase), "{msg}");
            }
        }
    }

    #[test]
    fn accepts_the_limits_themselves() {
        let lo = Vitals {
            respiratory_rate: f64::from(limits::RESPIRATORY_RATE.0),
            spo2: f64::from(limits::SPO2.0),
            systolic_bp: f64::from(limits::SYSTOLIC_BP.0),
            pulse: f64::from(limits::PULSE.0),
            temperature: f64::from(limits::TEMPERATURE.0),
            ..normal()
        };
        assert!(score(&lo).is_ok());
        let hi = Vitals {
            respiratory_rate: f64::from(limits::RESPIRATORY_RATE.1),
            spo2: f64::from(limits::SPO2.1),
            systolic_bp: f64::from(limits::SYSTOLIC_BP.1),
            pulse: f64::from(limits::PULSE.1),
            temperature: f64::from(limits::TEMPERATURE.1),
            ..normal()
        };
        assert!(score(&hi).is_ok());
    }

    #[test]
    fn first_invalid_field_is_reported() {
        let v = Vitals {
            spo2: 120.0,
            temperature: f64::NAN,
            ..normal()
        };
        assert_eq!(score(&v).expect_err("must reject").field, "spo2");
    }
}
