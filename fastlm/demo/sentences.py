"""The demo's BERT batch: 32 everyday English sentences of very different lengths.

Real encoder traffic (search queries next to paragraphs, chat turns next to documents) pads
a short sentence to the longest one in its batch, so a large share of a padded batch is
padding. These run from 3 to about 60 words, which after tokenization leaves about two
thirds of the padded (32, longest) batch as padding, as in a real batch of mixed inputs.
"""

from __future__ import annotations

SENTENCES = (
    "Thanks, see you.",
    "Where is the nearest train station?",
    "The meeting has been moved to Thursday afternoon because the projector in room four is broken.",
    "I forgot my umbrella.",
    "After three weeks of rain the river finally burst its banks, flooding the low fields on "
    "the east side of the village and cutting off the road to the school until the water "
    "went down again.",
    "Could you send me the report before lunch?",
    "She learned to play the violin at the age of six and gave her first concert in the town "
    "hall two years later.",
    "The dogs bark.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and enough milk to make "
    "a smooth batter.",
    "Please keep the door closed so the cat stays inside.",
    "When the power went out during the storm, we lit candles, played cards at the kitchen "
    "table, and listened to the wind until well after midnight, which the children later "
    "remembered as the best evening of the whole holiday even though nobody slept much.",
    "Our flight was delayed by two hours.",
    "He opened the old wooden box and found a bundle of letters tied with a faded blue ribbon.",
    "It is sunny today.",
    "The library will stay open late during exam week, and students can borrow laptops at the "
    "front desk with their card.",
    "Turn left at the bakery, then walk straight on for about five minutes.",
    "Most of the paintings in the museum were donated by a single family who had collected "
    "them over four generations, and the guided tour explains how each piece was found, "
    "restored and finally brought to the city, where thousands of visitors now see them "
    "every year, many of them schoolchildren on their first visit.",
    "I love this song.",
    "The new bridge cut the drive across the bay from forty minutes to less than ten.",
    "Can we talk tomorrow?",
    "Water boils at a lower temperature on a high mountain because the air pressure there is "
    "lower.",
    "My grandmother grew tomatoes, beans and potatoes in a small garden behind the house, "
    "and every summer she gave away more vegetables than the family could ever eat.",
    "The battery is almost empty.",
    "Before you submit the form, check that your name, address and date of birth match the "
    "details in your passport exactly.",
    "We watched the sun set over the harbour while the fishing boats came back in.",
    "The committee reviewed more than two hundred applications this spring, interviewed the "
    "twenty strongest candidates over three long days in a borrowed classroom, and in the "
    "end offered scholarships to eight students whose projects combined careful research "
    "with a clear and practical plan for how the money would be spent in their own towns "
    "and villages over the next two years.",
    "Lunch is ready.",
    "The train to the airport leaves every fifteen minutes from platform two.",
    "He fixed the bicycle chain with nothing but a screwdriver and some patience.",
    "Remember to water the plants while I am away.",
    "Scientists measured the glacier every spring for thirty years and found that it had "
    "retreated by almost a kilometre, most of that in the last decade.",
    "Good morning, everyone.",
)
