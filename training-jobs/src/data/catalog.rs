//! The catalogue's words: genres, cities, and the pieces movie titles and descriptions are made
//! of. A description names who the story follows, where it happens and what they must do, each in
//! one of several wordings; a search query for a movie names the same three things in other words,
//! so finding the movie from the query takes meaning, not matching words (what movie search is
//! evaluated on).

use std::collections::{HashMap, HashSet};

use rand::RngExt;
use rand::seq::IndexedRandom;

use super::Rng;

/// Genres, in the order of every genre vector (user tastes, movie genre weights).
pub const GENRES: [&str; 12] = [
    "action",
    "comedy",
    "drama",
    "horror",
    "sci-fi",
    "romance",
    "animation",
    "thriller",
    "documentary",
    "fantasy",
    "family",
    "crime",
];

/// A city: name, latitude, longitude, and its share of users and theaters.
pub struct City {
    pub name: &'static str,
    pub lat: f64,
    pub lon: f64,
    pub weight: f64,
}

pub const CITIES: [City; 8] = [
    City {
        name: "Lisbon",
        lat: 38.72,
        lon: -9.14,
        weight: 3.0,
    },
    City {
        name: "Porto",
        lat: 41.15,
        lon: -8.61,
        weight: 2.0,
    },
    City {
        name: "Madrid",
        lat: 40.42,
        lon: -3.70,
        weight: 4.0,
    },
    City {
        name: "Barcelona",
        lat: 41.39,
        lon: 2.17,
        weight: 3.5,
    },
    City {
        name: "Seville",
        lat: 37.39,
        lon: -5.98,
        weight: 1.5,
    },
    City {
        name: "Valencia",
        lat: 39.47,
        lon: -0.38,
        weight: 1.5,
    },
    City {
        name: "Bilbao",
        lat: 43.26,
        lon: -2.93,
        weight: 1.0,
    },
    City {
        name: "Coimbra",
        lat: 40.21,
        lon: -8.43,
        weight: 0.6,
    },
];

/// One idea with several wordings: descriptions use one, queries for the same movie another.
struct Idea {
    wordings: &'static [&'static str],
}

const fn idea(wordings: &'static [&'static str]) -> Idea {
    Idea { wordings }
}

/// Who a story follows.
const PROTAGONISTS: &[Idea] = &[
    idea(&[
        "a retired safecracker",
        "an ageing vault breaker",
        "a former safe-cracking expert",
    ]),
    idea(&[
        "a young nurse",
        "a hospital nurse in her twenties",
        "a newly qualified nurse",
    ]),
    idea(&[
        "a small-town sheriff",
        "a rural police chief",
        "a county lawman",
    ]),
    idea(&[
        "a struggling jazz pianist",
        "a broke piano player in a jazz band",
        "a jazz musician down on his luck",
    ]),
    idea(&[
        "a teenage hacker",
        "a high-school computer prodigy",
        "a sixteen-year-old coder",
    ]),
    idea(&[
        "a widowed fisherman",
        "a lonely fisherman who lost his wife",
        "a grieving trawlerman",
    ]),
    idea(&[
        "an astronaut stranded alone",
        "a marooned space explorer",
        "a lone cosmonaut left behind",
    ]),
    idea(&[
        "a famous chef",
        "a celebrated cook",
        "a star of the restaurant world",
    ]),
    idea(&[
        "a rookie detective",
        "a first-year investigator",
        "an inexperienced police detective",
    ]),
    idea(&[
        "a stubborn grandmother",
        "a headstrong old granny",
        "an obstinate elderly woman",
    ]),
    idea(&[
        "a shy librarian",
        "a timid keeper of books",
        "a quiet library clerk",
    ]),
    idea(&[
        "a washed-up boxer",
        "a fading prizefighter",
        "a boxer past his prime",
    ]),
    idea(&[
        "a runaway princess",
        "a royal heir on the run",
        "a fugitive young queen-to-be",
    ]),
    idea(&[
        "a mute stable boy",
        "a silent young groom who tends horses",
        "a boy who cannot speak and works with horses",
    ]),
    idea(&[
        "an exiled wizard",
        "a banished sorcerer",
        "a magician cast out of his order",
    ]),
    idea(&[
        "a cynical war photographer",
        "a jaded combat photojournalist",
        "a disillusioned conflict photographer",
    ]),
    idea(&["a talking fox", "a fox who can speak", "a chatty red fox"]),
    idea(&[
        "a pair of estranged sisters",
        "two sisters who stopped speaking years ago",
        "sisters long divorced from each other",
    ]),
    idea(&[
        "a clumsy wedding planner",
        "an accident-prone organiser of weddings",
        "a hapless bridal coordinator",
    ]),
    idea(&[
        "an undercover agent",
        "a spy working under a false identity",
        "a covert operative",
    ]),
    idea(&[
        "a marine biologist",
        "an ocean scientist",
        "a researcher who studies sea life",
    ]),
    idea(&[
        "a disgraced surgeon",
        "a doctor struck off for malpractice",
        "a fallen heart surgeon",
    ]),
    idea(&[
        "a street magician",
        "a card trickster who performs on sidewalks",
        "an illusionist working the streets",
    ]),
    idea(&[
        "a lighthouse keeper",
        "the keeper of a remote beacon",
        "a man who tends a coastal lighthouse",
    ]),
    idea(&[
        "a robot housekeeper",
        "a domestic android",
        "a mechanical maid",
    ]),
    idea(&[
        "a high-school football coach",
        "a coach of a teenage football team",
        "a schoolboy soccer trainer",
    ]),
    idea(&[
        "a taxi driver",
        "a cab driver working nights",
        "a city cabbie",
    ]),
    idea(&[
        "a forensic accountant",
        "a fraud investigator who reads ledgers",
        "an auditor who follows the money",
    ]),
    idea(&["a young dragon", "a baby dragon", "a dragon hatchling"]),
    idea(&[
        "an immigrant baker",
        "a baker who moved from abroad",
        "a newcomer who runs a bakery",
    ]),
    idea(&[
        "a mountain guide",
        "a climbing guide",
        "an alpine guide who leads expeditions",
    ]),
    idea(&["a ghost", "a restless spirit", "the spirit of a dead woman"]),
    idea(&["a con artist", "a swindler", "a professional grifter"]),
    idea(&[
        "a wildlife ranger",
        "a park ranger protecting animals",
        "a game warden",
    ]),
    idea(&[
        "an orphaned violinist",
        "a violin prodigy with no parents",
        "an orphan who plays the violin",
    ]),
    idea(&[
        "a tired night-shift janitor",
        "a cleaner who works nights",
        "an overnight custodian",
    ]),
];

/// Where a story happens.
const SETTINGS: &[Idea] = &[
    idea(&[
        "in Lisbon",
        "in the Portuguese capital",
        "on the hills of Lisbon",
    ]),
    idea(&[
        "on a Martian colony",
        "in a settlement on Mars",
        "on the red planet",
    ]),
    idea(&[
        "in a small fishing village",
        "in a tiny coastal hamlet",
        "in a seaside village of fishermen",
    ]),
    idea(&[
        "in 1920s Chicago",
        "in Prohibition-era Chicago",
        "in Chicago during the roaring twenties",
    ]),
    idea(&[
        "aboard a transatlantic liner",
        "on an ocean liner crossing the Atlantic",
        "on a cruise ship at sea",
    ]),
    idea(&[
        "in a haunted boarding school",
        "in a cursed school for boarders",
        "in a boarding school with a ghost problem",
    ]),
    idea(&[
        "in the Amazon rainforest",
        "deep in the Amazon jungle",
        "in the South American rainforest",
    ]),
    idea(&[
        "in a snowbound mountain hotel",
        "in an alpine hotel cut off by snow",
        "in a hotel trapped by a blizzard",
    ]),
    idea(&[
        "in a near-future Tokyo",
        "in Tokyo a few decades from now",
        "in a futuristic Japanese capital",
    ]),
    idea(&[
        "on a remote Scottish island",
        "on an isolated island off Scotland",
        "on a lonely Hebridean isle",
    ]),
    idea(&[
        "in a crumbling Victorian mansion",
        "in a decaying nineteenth-century manor",
        "in an old Victorian house falling apart",
    ]),
    idea(&[
        "inside a busy hospital",
        "in a crowded city hospital",
        "on the wards of a packed hospital",
    ]),
    idea(&[
        "in the Sahara desert",
        "in the North African desert",
        "among the dunes of the Sahara",
    ]),
    idea(&[
        "in a kingdom of floating islands",
        "in a realm of islands in the sky",
        "in a land of islands that float above the clouds",
    ]),
    idea(&[
        "in suburban New Jersey",
        "in a New Jersey suburb",
        "in the suburbs outside New York",
    ]),
    idea(&[
        "on a space station orbiting Jupiter",
        "aboard a station circling Jupiter",
        "in orbit around Jupiter",
    ]),
    idea(&[
        "in a Paris bakery",
        "in a patisserie in Paris",
        "in a French bakery in the capital",
    ]),
    idea(&[
        "in a Siberian prison camp",
        "in a gulag in Siberia",
        "in a labour camp in frozen Siberia",
    ]),
    idea(&[
        "at a Texas rodeo",
        "at a rodeo in Texas",
        "among the cowboys of a Texan rodeo",
    ]),
    idea(&[
        "in an underwater city",
        "in a city beneath the sea",
        "in a metropolis on the ocean floor",
    ]),
    idea(&[
        "in a Venice carnival",
        "during the carnival in Venice",
        "among the masks of the Venetian carnival",
    ]),
    idea(&[
        "in a dying mining town",
        "in a mining town running out of work",
        "in a failing coal town",
    ]),
    idea(&[
        "in medieval Kyoto",
        "in Kyoto in the middle ages",
        "in old Kyoto under the shoguns",
    ]),
    idea(&[
        "in a Berlin nightclub",
        "in a club in Berlin",
        "on the Berlin techno scene",
    ]),
    idea(&[
        "in the Australian outback",
        "in the Australian bush",
        "in the empty interior of Australia",
    ]),
    idea(&[
        "in a Mumbai film studio",
        "in a Bollywood studio",
        "on a film set in Mumbai",
    ]),
    idea(&[
        "at the bottom of the ocean",
        "in the deepest part of the sea",
        "in the abyss of the ocean",
    ]),
    idea(&[
        "in an enchanted forest",
        "in a magical woodland",
        "in a forest under a spell",
    ]),
    idea(&[
        "in a Norwegian fjord town",
        "in a town on a Norwegian fjord",
        "by a fjord in Norway",
    ]),
    idea(&[
        "in wartime London",
        "in London during the Blitz",
        "in London under the bombs of the war",
    ]),
];

/// What the story is about, by genre (the index into [`GENRES`]).
const PLOTS: [&[Idea]; 12] = [
    // action
    &[
        idea(&[
            "must stop a hijacked train",
            "has to halt a seized train",
            "races to stop a train taken by gunmen",
        ]),
        idea(&[
            "fights a private army",
            "takes on a band of mercenaries",
            "battles hired soldiers",
        ]),
        idea(&[
            "has one night to rescue a kidnapped daughter",
            "must save an abducted child before dawn",
            "hunts for a kidnapped girl through one night",
        ]),
        idea(&[
            "escapes from a burning skyscraper",
            "fights their way out of a tower on fire",
            "flees a blazing high-rise",
        ]),
        idea(&[
            "pulls off one last heist",
            "plans a final big robbery",
            "attempts a last great bank job",
        ]),
    ],
    // comedy
    &[
        idea(&[
            "accidentally inherits a circus",
            "finds themselves the owner of a travelling circus",
            "is left a circus in a will",
        ]),
        idea(&[
            "pretends to be engaged to fool the family",
            "fakes an engagement for the relatives",
            "invents a fiance to please their parents",
        ]),
        idea(&[
            "swaps lives with a stranger",
            "trades places with someone they just met",
            "wakes up living another person's life",
        ]),
        idea(&[
            "tries to win a baking contest",
            "enters a cake competition",
            "competes in a pastry championship",
        ]),
        idea(&[
            "gets stuck on the worst holiday ever",
            "suffers a disastrous vacation",
            "survives a holiday where everything goes wrong",
        ]),
    ],
    // drama
    &[
        idea(&[
            "returns home to care for a dying father",
            "comes back to nurse a sick parent",
            "goes home to look after a father near death",
        ]),
        idea(&[
            "fights to keep the family farm",
            "struggles to save the farm from the bank",
            "battles to hold on to the family land",
        ]),
        idea(&[
            "confronts a buried family secret",
            "uncovers what the family kept hidden",
            "faces a secret the family never spoke of",
        ]),
        idea(&[
            "rebuilds a life after prison",
            "starts over after years behind bars",
            "tries to begin again once released from jail",
        ]),
        idea(&[
            "teaches a class nobody else will",
            "takes on the school's most difficult pupils",
            "becomes the teacher of unruly students",
        ]),
    ],
    // horror
    &[
        idea(&[
            "is hunted by something in the walls",
            "hears a creature living inside the walls",
            "is stalked by a thing behind the wallpaper",
        ]),
        idea(&[
            "wakes an ancient curse",
            "unleashes an old curse",
            "disturbs a malediction from the past",
        ]),
        idea(&[
            "spends a night in a house where people vanish",
            "stays overnight in a house that swallows its guests",
            "sleeps in a home where visitors disappear",
        ]),
        idea(&[
            "is followed by a faceless stranger",
            "is pursued by a man with no face",
            "is haunted by a featureless figure",
        ]),
        idea(&[
            "discovers the neighbours are not human",
            "learns the people next door are monsters",
            "finds out the family next door is something else",
        ]),
    ],
    // sci-fi
    &[
        idea(&[
            "receives messages from the future",
            "gets signals sent back in time",
            "decodes transmissions from years ahead",
        ]),
        idea(&[
            "leads a mission to a dying star",
            "commands an expedition to a collapsing sun",
            "pilots a ship toward a failing star",
        ]),
        idea(&[
            "builds a machine that copies people",
            "invents a device that clones humans",
            "creates a duplicator for people",
        ]),
        idea(&[
            "discovers the city is a simulation",
            "learns their world is a computer program",
            "realises reality is simulated",
        ]),
        idea(&[
            "makes first contact with an alien species",
            "meets extraterrestrials for the first time",
            "greets the first visitors from another world",
        ]),
    ],
    // romance
    &[
        idea(&[
            "falls for a rival",
            "falls in love with their competitor",
            "develops feelings for an adversary",
        ]),
        idea(&[
            "finds letters from a lost love",
            "discovers old love letters",
            "reads a long-lost lover's letters",
        ]),
        idea(&[
            "meets the same stranger every summer",
            "reunites with a summer romance each year",
            "keeps running into the same person every August",
        ]),
        idea(&[
            "writes anonymous notes to a neighbour",
            "leaves secret love notes for the person next door",
            "courts a neighbour through unsigned letters",
        ]),
        idea(&[
            "gets a second chance with a first love",
            "reconnects with a childhood sweetheart",
            "meets a teenage love again years later",
        ]),
    ],
    // animation
    &[
        idea(&[
            "searches for a lost toy",
            "looks for a missing plaything",
            "goes on a quest to find a lost teddy",
        ]),
        idea(&[
            "learns to fly",
            "tries to take to the skies",
            "dreams of flying and tries",
        ]),
        idea(&[
            "leads a band of forest animals",
            "guides a troop of woodland creatures",
            "becomes the leader of the animals of the wood",
        ]),
        idea(&[
            "builds a rocket out of junk",
            "makes a spaceship from scrap",
            "constructs a rocket from rubbish",
        ]),
        idea(&[
            "saves the winter festival",
            "rescues the snow festival",
            "makes sure the winter celebration goes ahead",
        ]),
    ],
    // thriller
    &[
        idea(&[
            "witnesses a murder no one believes happened",
            "sees a killing that nobody believes",
            "is the only witness to a murder denied by everyone",
        ]),
        idea(&[
            "is framed for a crime",
            "is set up for a murder",
            "is blamed for a crime they did not commit",
        ]),
        idea(&[
            "races to defuse a bomb",
            "tries to disarm an explosive in time",
            "hunts for a hidden bomb against the clock",
        ]),
        idea(&[
            "uncovers a conspiracy in the government",
            "exposes a plot at the top of the state",
            "finds a cover-up reaching the ministers",
        ]),
        idea(&[
            "receives a phone call from a kidnapper",
            "gets a ransom call",
            "is contacted by an abductor",
        ]),
    ],
    // documentary
    &[
        idea(&[
            "follows the migration of whales",
            "tracks whales across the oceans",
            "documents the great whale journey",
        ]),
        idea(&[
            "investigates the collapse of a bank",
            "examines the fall of a financial giant",
            "looks into a bank failure",
        ]),
        idea(&[
            "records the last year of a dying language",
            "documents a language about to disappear",
            "films the final speakers of a vanishing tongue",
        ]),
        idea(&[
            "tells the story of a legendary rock band",
            "chronicles a famous rock group",
            "traces the history of a rock band",
        ]),
        idea(&[
            "shows how a cathedral was restored",
            "follows the restoration of a great church",
            "documents the rebuilding of a cathedral",
        ]),
    ],
    // fantasy
    &[
        idea(&[
            "searches for a stolen crown",
            "hunts for a crown that was taken",
            "quests after a missing royal crown",
        ]),
        idea(&[
            "must break a sleeping spell",
            "has to lift an enchantment of endless sleep",
            "tries to wake a kingdom from a spell",
        ]),
        idea(&[
            "tames a sea serpent",
            "befriends a giant sea snake",
            "wins over a monster of the waves",
        ]),
        idea(&[
            "leads a rebellion against a witch queen",
            "rises up against an evil sorceress",
            "heads a revolt against a wicked queen",
        ]),
        idea(&[
            "finds a door to another world",
            "discovers a portal to a different realm",
            "opens a gateway to another land",
        ]),
    ],
    // family
    &[
        idea(&[
            "adopts a giant dog",
            "takes in an enormous dog",
            "brings home a huge puppy",
        ]),
        idea(&[
            "goes on a road trip across the country",
            "drives across the country with the kids",
            "takes the family on a long car journey",
        ]),
        idea(&[
            "enters the school talent show",
            "competes in the school talent contest",
            "performs at the school show",
        ]),
        idea(&[
            "saves the town's old cinema",
            "rescues the local movie theatre",
            "keeps the neighbourhood cinema from closing",
        ]),
        idea(&[
            "camps in the woods for the first time",
            "spends a first night camping outdoors",
            "goes camping in the forest",
        ]),
    ],
    // crime
    &[
        idea(&[
            "infiltrates a drug cartel",
            "goes inside a narcotics gang",
            "works undercover in a drug ring",
        ]),
        idea(&[
            "investigates a string of art thefts",
            "chases a gang stealing paintings",
            "tracks down stolen masterpieces",
        ]),
        idea(&[
            "takes over the family mob business",
            "inherits a crime family",
            "becomes head of the mafia clan",
        ]),
        idea(&[
            "solves a murder on a locked train",
            "investigates a killing in a sealed railway carriage",
            "finds who committed a murder on a train",
        ]),
        idea(&[
            "launders money for the mob",
            "cleans dirty money for gangsters",
            "moves cash for organised crime",
        ]),
    ],
];

/// How descriptions open and close, so they do not all read alike.
const TONES: [&[&str]; 12] = [
    &[
        "A relentless, explosive ride.",
        "Non-stop action from start to finish.",
        "Stunts and chases at full speed.",
    ],
    &[
        "A warm and silly comedy.",
        "Laughs from beginning to end.",
        "A feel-good comedy of errors.",
    ],
    &[
        "A quiet, moving drama.",
        "An intimate portrait of ordinary people.",
        "A drama about what we owe each other.",
    ],
    &[
        "Not for the faint of heart.",
        "A slow-burning nightmare.",
        "Terror that creeps up on you.",
    ],
    &[
        "Big ideas and bigger worlds.",
        "A thoughtful science-fiction story.",
        "A journey to the edge of what is possible.",
    ],
    &[
        "A tender love story.",
        "A romance that takes its time.",
        "Love, longing and second chances.",
    ],
    &[
        "Animated adventure for all ages.",
        "A colourful animated tale.",
        "Hand-drawn charm and big heart.",
    ],
    &[
        "Tension that never lets go.",
        "A twisting, paranoid thriller.",
        "Every clue leads somewhere darker.",
    ],
    &[
        "A revealing documentary.",
        "Real people, real stakes.",
        "Told through archive footage and interviews.",
    ],
    &[
        "An epic fantasy adventure.",
        "Magic, monsters and courage.",
        "A sweeping tale of myth and wonder.",
    ],
    &[
        "Fun for the whole family.",
        "A gentle film for kids and parents.",
        "Family entertainment with heart.",
    ],
    &[
        "A gritty crime story.",
        "Crime, loyalty and betrayal.",
        "A hard-boiled tale of the underworld.",
    ],
];

const TITLE_WORDS: [&[&str]; 12] = [
    &[
        "Fury",
        "Velocity",
        "Ironclad",
        "Breakpoint",
        "Overdrive",
        "Blackout",
        "Rampage",
        "Lockdown",
    ],
    &[
        "Oops",
        "Mixed Up",
        "Best Man",
        "Party Crashers",
        "Wild Weekend",
        "Nonsense",
        "Lucky Break",
        "Mayhem",
    ],
    &[
        "Quiet Harbour",
        "The Long Road",
        "Homecoming",
        "Still Water",
        "Inheritance",
        "The Letter",
        "Roots",
        "Tides",
    ],
    &[
        "The Hollow",
        "Whispers",
        "Night Visitors",
        "The Cellar",
        "Bleak House",
        "Rot",
        "The Pale Ones",
        "Hush",
    ],
    &[
        "Signal",
        "Event Horizon",
        "Parallax",
        "Orbit",
        "Singularity",
        "Echoes",
        "The Array",
        "Null Point",
    ],
    &[
        "Summer Letters",
        "Close to You",
        "Second Spring",
        "Love Notes",
        "Stay",
        "The Promise",
        "Forever Yours",
        "Serenade",
    ],
    &[
        "Sky Pals",
        "Little Comet",
        "Whiskers",
        "The Lost Teddy",
        "Snowdrop",
        "Paper Rockets",
        "Tumble",
        "Pip",
    ],
    &[
        "Alibi",
        "Deadline",
        "The Witness",
        "Cold Trail",
        "Safe House",
        "Countdown",
        "Vanishing Point",
        "Cipher",
    ],
    &[
        "Deep Blue",
        "Ledger",
        "Last Words",
        "Stone and Glass",
        "The Band",
        "Currents",
        "Harvest",
        "Ground Truth",
    ],
    &[
        "The Crown",
        "Wyrm",
        "Moonspell",
        "Skyborne",
        "The Hollow Throne",
        "Emberfall",
        "Thornwood",
        "Riftgate",
    ],
    &[
        "Big Paws",
        "Road Trip",
        "Showtime",
        "The Old Cinema",
        "Campfire",
        "Best Friends",
        "Backyard",
        "Kite",
    ],
    &[
        "The Family",
        "Laundered",
        "Kingpin",
        "Canvas",
        "Blood Money",
        "The Syndicate",
        "Locked Car",
        "Dirty Hands",
    ],
];

/// A movie's text: its title, the description shown to users and embedded for search, and the
/// ideas it was built from (for queries).
pub struct MovieText {
    pub title: String,
    pub description: String,
    genre: usize,
    protagonist: usize,
    setting: usize,
    plot: usize,
    wording: usize,
}

/// Writes the catalogue's texts, keeping them apart: no two movies of a genre share who, where
/// and what (so a query naming all three has one right answer), and no two share a title (a
/// reused title word becomes a sequel: "Kingpin", "Kingpin II").
#[derive(Default)]
pub struct Writer {
    stories: HashSet<(usize, usize, usize, usize)>,
    titles: HashMap<&'static str, usize>,
}

impl Writer {
    /// Writes a movie of primary genre `genre`.
    pub fn movie_text(&mut self, rng: &mut Rng, genre: usize) -> MovieText {
        let mut story = self.story(rng, genre);
        // 36 × 30 × 5+ stories per genre: a fresh one is found in a few draws at any scale
        // this generator makes; past that, repeats are allowed rather than looping forever.
        for _ in 0..64 {
            if self.stories.insert((genre, story.0, story.1, story.2)) {
                break;
            }
            story = self.story(rng, genre);
        }
        let (protagonist, setting, plot) = story;
        let wording = rng.random_range(0..3);
        let who = PROTAGONISTS[protagonist].wordings[wording];
        let place = SETTINGS[setting].wordings[wording];
        let what = PLOTS[genre][plot].wordings[wording];
        let tone = TONES[genre].choose(rng).copied().unwrap_or_default();
        let sentence = match rng.random_range(0..3) {
            0 => format!("{} {what} {place}.", capitalise(who)),
            1 => format!("{}, {who} {what}.", capitalise(place)),
            _ => format!("This is the story of {who}, who {what} {place}."),
        };
        let description = if rng.random_bool(0.5) {
            format!("{sentence} {tone}")
        } else {
            format!("{tone} {sentence}")
        };
        let word = TITLE_WORDS[genre]
            .choose(rng)
            .copied()
            .unwrap_or("Untitled");
        let count = self.titles.entry(word).or_default();
        *count += 1;
        let title = match *count {
            1 => word.to_string(),
            n => format!("{word} {}", roman(n)),
        };
        MovieText {
            title,
            description,
            genre,
            protagonist,
            setting,
            plot,
            wording,
        }
    }

    fn story(&self, rng: &mut Rng, genre: usize) -> (usize, usize, usize) {
        (
            rng.random_range(0..PROTAGONISTS.len()),
            rng.random_range(0..SETTINGS.len()),
            rng.random_range(0..PLOTS[genre].len()),
        )
    }
}

/// A search query for `movie`: all three of its ideas, each in the wording that shares the
/// fewest words with the one its description uses.
pub fn query_for(rng: &mut Rng, movie: &MovieText) -> String {
    let who = reworded(rng, &PROTAGONISTS[movie.protagonist], movie.wording);
    let place = reworded(rng, &SETTINGS[movie.setting], movie.wording);
    let what = reworded(rng, &PLOTS[movie.genre][movie.plot], movie.wording);
    match rng.random_range(0..4) {
        0 => format!("film where {who} {what} {place}"),
        1 => format!(
            "{} movie about {who} who {what} {place}",
            GENRES[movie.genre]
        ),
        2 => format!("the one with {who} who {what} {place}"),
        _ => format!("{place}, {who} {what}"),
    }
}

/// Another wording of `idea` than `used`: the one sharing fewest content words with it.
fn reworded(rng: &mut Rng, idea: &Idea, used: usize) -> &'static str {
    let words = content_words(idea.wordings[used]);
    let first = (used + rng.random_range(1..3)) % 3;
    let second = 3 - used - first;
    let shared = |w: usize| content_words(idea.wordings[w]).intersection(&words).count();
    if shared(second) < shared(first) {
        idea.wordings[second]
    } else {
        idea.wordings[first]
    }
}

/// The words of `text` that carry meaning: lower-cased, without the small words every sentence has.
pub fn content_words(text: &str) -> HashSet<String> {
    const SMALL: &[&str] = &[
        "a", "an", "the", "of", "in", "on", "at", "to", "and", "who", "with", "his", "her",
        "their", "for", "from", "by", "as", "into", "is", "be", "it", "its", "that", "this", "one",
        "film", "movie", "about", "where", "story",
    ];
    text.split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '-')
        .map(str::to_lowercase)
        .filter(|w| !w.is_empty() && !SMALL.contains(&w.as_str()))
        .collect()
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn roman(n: usize) -> String {
    const NUMERALS: [(usize, &str); 9] = [
        (100, "C"),
        (90, "XC"),
        (50, "L"),
        (40, "XL"),
        (10, "X"),
        (9, "IX"),
        (5, "V"),
        (4, "IV"),
        (1, "I"),
    ];
    let mut n = n;
    let mut text = String::new();
    for (value, numeral) in NUMERALS {
        while n >= value {
            text.push_str(numeral);
            n -= value;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn every_idea_has_three_wordings_and_every_genre_its_plots() {
        for ideas in PLOTS.iter().chain([PROTAGONISTS, SETTINGS].iter()) {
            for idea in *ideas {
                assert_eq!(idea.wordings.len(), 3, "{:?}", idea.wordings);
            }
        }
        assert!(PLOTS.iter().all(|plots| plots.len() >= 5));
    }

    #[test]
    fn a_query_names_its_movie_in_other_words() {
        let mut rng = Rng::seed_from_u64(3);
        let mut writer = Writer::default();
        let (mut shared, mut total) = (0, 0);
        for index in 0..600 {
            let genre = index % GENRES.len();
            let movie = writer.movie_text(&mut rng, genre);
            let query = query_for(&mut rng, &movie);
            let who = PROTAGONISTS[movie.protagonist].wordings[movie.wording];
            let description = movie.description.to_lowercase();
            assert!(description.contains(who), "{description}");
            assert!(!query.contains(who), "{query} reuses '{who}'");
            let in_description = content_words(&description);
            let words = content_words(&query);
            shared += words.intersection(&in_description).count();
            total += words.len();
        }
        // Some words stay (names of places, a "nurse" is a nurse), most do not.
        let share = shared as f64 / total as f64;
        assert!(
            share < 0.2,
            "{share:.3} of query words are in the description"
        );
    }

    #[test]
    fn stories_and_titles_do_not_repeat() {
        let mut rng = Rng::seed_from_u64(4);
        let mut writer = Writer::default();
        let mut stories = HashSet::new();
        let mut titles = HashSet::new();
        for index in 0..5_000 {
            let movie = writer.movie_text(&mut rng, index % GENRES.len());
            assert!(stories.insert((movie.genre, movie.protagonist, movie.setting, movie.plot)));
            assert!(titles.insert(movie.title.clone()), "{} twice", movie.title);
        }
    }

    #[test]
    fn roman_numerals() {
        assert_eq!(roman(2), "II");
        assert_eq!(roman(14), "XIV");
        assert_eq!(roman(49), "XLIX");
    }
}
