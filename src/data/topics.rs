//! Topic ids shared by the stance data and the gate.

/// Economic-axis topics.
pub const ECONOMIC: &[&str] = &[
    "taxes",
    "healthcare",
    "labor",
    "welfare",
    "trade",
    "regulation",
    "climate_energy",
    "housing",
    "education",
];

/// Social-axis topics.
pub const SOCIAL: &[&str] = &[
    "immigration",
    "abortion",
    "guns",
    "crime_policing",
    "lgbtq",
    "religion",
    "speech",
    "drugs",
    "death_penalty",
    "foreign_military",
    "race_equity",
];

/// Everything that is not political.
pub const NON_POLITICAL: &str = "non_political";

/// The axis of a political topic, `None` for unknown or non-political ids.
pub fn axis_of(topic: &str) -> Option<&'static str> {
    if ECONOMIC.contains(&topic) {
        Some("economic")
    } else if SOCIAL.contains(&topic) {
        Some("social")
    } else {
        None
    }
}

/// All 21 gate classes: the 20 political topics, then `non_political`.
pub fn all_topics() -> Vec<&'static str> {
    ECONOMIC
        .iter()
        .chain(SOCIAL)
        .copied()
        .chain(std::iter::once(NON_POLITICAL))
        .collect()
}

/// True for the 20 political topic ids.
pub fn is_political(topic: &str) -> bool {
    axis_of(topic).is_some()
}
