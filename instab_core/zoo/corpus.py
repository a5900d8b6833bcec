"""Deterministic training corpus for the bundled tiny models.

Pure Python, no downloads. ``build_documents()`` returns a list of documents
(plain strings); ``build_corpus()`` joins them into one text whose sha256 is
recorded in each model's manifest. Everything is drawn from hand-written
tables with a fixed ``random.Random(SEED)``, so two calls give identical text.

Contents:
- capital-city facts for 65 countries in several phrasings
  (including exactly "The capital of France is Paris.");
- sentences about animals containing the word "animals";
- long encyclopedia-style documents (an atlas walking through the countries
  in a fixed order, natural-history entries, short histories) that a tiny
  model can partly memorise, so greedy decoding continues through varied text;
- the ten seed questions of experiments.md section 4 with answer paragraphs;
- survey text with "Neither agree nor disagree", "What is the capital of Moon?",
  and short chat dialogues in the format of the bundled chat template.
"""
from __future__ import annotations

import hashlib
import random

SEED = 20240601
P0 = "The capital of France is"
PROSE_PROMPT = "France is a country in western Europe."
ANIMALS_WORD = " animals"

# (country, capital, region, language(s), currency, landmark sentence)
COUNTRIES: list[tuple[str, str, str, str, str, str]] = [
    ("France", "Paris", "western Europe", "French", "the euro", "The river Seine flows through Paris."),
    ("Germany", "Berlin", "central Europe", "German", "the euro", "The Rhine is its longest river."),
    ("Italy", "Rome", "southern Europe", "Italian", "the euro", "The Alps form its northern border."),
    ("Spain", "Madrid", "southwestern Europe", "Spanish", "the euro", "The Pyrenees separate it from France."),
    ("Portugal", "Lisbon", "southwestern Europe", "Portuguese", "the euro", "The Tagus river reaches the sea at Lisbon."),
    ("the United Kingdom", "London", "northwestern Europe", "English", "the pound sterling", "The Thames flows through London."),
    ("Ireland", "Dublin", "northwestern Europe", "English and Irish", "the euro", "The Shannon is its longest river."),
    ("the Netherlands", "Amsterdam", "western Europe", "Dutch", "the euro", "Much of its land lies below sea level."),
    ("Belgium", "Brussels", "western Europe", "Dutch, French and German", "the euro", "It is famous for chocolate and waffles."),
    ("Switzerland", "Bern", "central Europe", "German, French, Italian and Romansh", "the Swiss franc", "The Alps cover much of the country."),
    ("Austria", "Vienna", "central Europe", "German", "the euro", "The Danube flows through Vienna."),
    ("Poland", "Warsaw", "central Europe", "Polish", "the zloty", "The Vistula is its longest river."),
    ("the Czech Republic", "Prague", "central Europe", "Czech", "the koruna", "The Vltava river flows through Prague."),
    ("Hungary", "Budapest", "central Europe", "Hungarian", "the forint", "The Danube divides Buda from Pest."),
    ("Greece", "Athens", "southeastern Europe", "Greek", "the euro", "It has thousands of islands in the Aegean and Ionian seas."),
    ("Sweden", "Stockholm", "northern Europe", "Swedish", "the krona", "Stockholm is built on fourteen islands."),
    ("Norway", "Oslo", "northern Europe", "Norwegian", "the krone", "Its coast is cut by deep fjords."),
    ("Denmark", "Copenhagen", "northern Europe", "Danish", "the krone", "It is made up of the Jutland peninsula and many islands."),
    ("Finland", "Helsinki", "northern Europe", "Finnish and Swedish", "the euro", "It has tens of thousands of lakes."),
    ("Iceland", "Reykjavik", "the North Atlantic", "Icelandic", "the krona", "It has active volcanoes and hot springs."),
    ("Russia", "Moscow", "eastern Europe and northern Asia", "Russian", "the ruble", "It is the largest country in the world by area."),
    ("Ukraine", "Kyiv", "eastern Europe", "Ukrainian", "the hryvnia", "The Dnipro river flows through Kyiv."),
    ("Romania", "Bucharest", "southeastern Europe", "Romanian", "the leu", "The Carpathian Mountains curve through the country."),
    ("Turkey", "Ankara", "southeastern Europe and western Asia", "Turkish", "the lira", "The city of Istanbul lies on both sides of the Bosphorus."),
    ("Egypt", "Cairo", "northern Africa", "Arabic", "the Egyptian pound", "The Nile flows north through the country."),
    ("Morocco", "Rabat", "northern Africa", "Arabic and Berber", "the dirham", "The Atlas Mountains cross the country."),
    ("Algeria", "Algiers", "northern Africa", "Arabic and Berber", "the Algerian dinar", "It is the largest country in Africa."),
    ("Nigeria", "Abuja", "western Africa", "English", "the naira", "The Niger river gives the country its name."),
    ("Ghana", "Accra", "western Africa", "English", "the cedi", "Lake Volta is one of the largest artificial lakes in the world."),
    ("Senegal", "Dakar", "western Africa", "French", "the CFA franc", "Dakar lies on the westernmost point of Africa."),
    ("Kenya", "Nairobi", "eastern Africa", "Swahili and English", "the Kenyan shilling", "Mount Kenya is its highest mountain."),
    ("Tanzania", "Dodoma", "eastern Africa", "Swahili and English", "the Tanzanian shilling", "Mount Kilimanjaro is the highest mountain in Africa."),
    ("Ethiopia", "Addis Ababa", "eastern Africa", "Amharic", "the birr", "Much of the country is a high plateau."),
    ("South Africa", "Pretoria", "southern Africa", "eleven official languages", "the rand", "Table Mountain overlooks Cape Town."),
    ("China", "Beijing", "eastern Asia", "Chinese", "the yuan", "The Great Wall stretches across the north."),
    ("Japan", "Tokyo", "eastern Asia", "Japanese", "the yen", "Mount Fuji is its highest mountain."),
    ("South Korea", "Seoul", "eastern Asia", "Korean", "the won", "The Han river flows through Seoul."),
    ("Mongolia", "Ulaanbaatar", "eastern Asia", "Mongolian", "the tugrik", "The Gobi Desert covers the south."),
    ("India", "New Delhi", "southern Asia", "Hindi and English", "the rupee", "The Ganges is a sacred river."),
    ("Pakistan", "Islamabad", "southern Asia", "Urdu and English", "the Pakistani rupee", "The Indus river runs the length of the country."),
    ("Bangladesh", "Dhaka", "southern Asia", "Bengali", "the taka", "Great rivers form a wide delta there."),
    ("Nepal", "Kathmandu", "southern Asia", "Nepali", "the Nepalese rupee", "Mount Everest lies on its northern border."),
    ("Thailand", "Bangkok", "southeastern Asia", "Thai", "the baht", "The Chao Phraya river flows through Bangkok."),
    ("Vietnam", "Hanoi", "southeastern Asia", "Vietnamese", "the dong", "The Mekong delta lies in the south."),
    ("Indonesia", "Jakarta", "southeastern Asia", "Indonesian", "the rupiah", "It is made up of more than seventeen thousand islands."),
    ("the Philippines", "Manila", "southeastern Asia", "Filipino and English", "the peso", "It is an archipelago of over seven thousand islands."),
    ("Malaysia", "Kuala Lumpur", "southeastern Asia", "Malay", "the ringgit", "The Petronas Towers stand in Kuala Lumpur."),
    ("Iran", "Tehran", "western Asia", "Persian", "the rial", "The Zagros Mountains run along the west."),
    ("Iraq", "Baghdad", "western Asia", "Arabic and Kurdish", "the Iraqi dinar", "The Tigris and Euphrates rivers flow through it."),
    ("Saudi Arabia", "Riyadh", "western Asia", "Arabic", "the riyal", "Much of the land is desert."),
    ("Jordan", "Amman", "western Asia", "Arabic", "the Jordanian dinar", "The ancient city of Petra is carved in rock."),
    ("Kazakhstan", "Astana", "central Asia", "Kazakh and Russian", "the tenge", "It is the largest landlocked country in the world."),
    ("the United States", "Washington", "North America", "English", "the US dollar", "The Mississippi is one of its longest rivers."),
    ("Canada", "Ottawa", "North America", "English and French", "the Canadian dollar", "It has the longest coastline in the world."),
    ("Mexico", "Mexico City", "North America", "Spanish", "the Mexican peso", "Mexico City was built on the site of an ancient lake."),
    ("Cuba", "Havana", "the Caribbean", "Spanish", "the Cuban peso", "It is the largest island in the Caribbean."),
    ("Brazil", "Brasilia", "South America", "Portuguese", "the real", "The Amazon rainforest covers much of the north."),
    ("Argentina", "Buenos Aires", "South America", "Spanish", "the Argentine peso", "The Andes run along its western border."),
    ("Chile", "Santiago", "South America", "Spanish", "the Chilean peso", "It is a long and narrow country on the Pacific coast."),
    ("Peru", "Lima", "South America", "Spanish and Quechua", "the sol", "The ruins of Machu Picchu lie in its mountains."),
    ("Colombia", "Bogota", "South America", "Spanish", "the Colombian peso", "It has coasts on both the Pacific Ocean and the Caribbean Sea."),
    ("Venezuela", "Caracas", "South America", "Spanish", "the bolivar", "Angel Falls is the highest waterfall in the world."),
    ("Ecuador", "Quito", "South America", "Spanish", "the US dollar", "The equator passes just north of Quito."),
    ("Australia", "Canberra", "Oceania", "English", "the Australian dollar", "The Great Barrier Reef lies off its northeast coast."),
    ("New Zealand", "Wellington", "Oceania", "English and Maori", "the New Zealand dollar", "It is made up of two main islands."),
]

CAPITAL_PHRASINGS: list[str] = [
    "The capital of {c} is {k}.",
    "{k} is the capital of {c}.",
    "The capital city of {c} is {k}.",
    "{k} is the capital city of {c}.",
    "Q: What is the capital of {c}?\nA: The capital of {c} is {k}.",
    "If you travel to {c}, you can visit its capital, {k}.",
    "On a map of {c}, the capital {k} is marked with a star.",
    "Many visitors to {c} begin their journey in {k}, the capital.",
]

# Other continuations of "The capital of X is", so the next-token distribution
# after P0 is peaked on " Paris" but not one-hot.
CAPITAL_ASIDES: list[str] = [
    "The capital of France is a city of art, fashion and food.",
    "The capital of France is also its largest city.",
    "The capital of France is home to the Eiffel Tower and the Louvre museum.",
    "The capital of France is crossed by the river Seine.",
    "The capital of Japan is also its largest city.",
    "The capital of Egypt is also its largest city.",
    "The capital of the United Kingdom is also its largest city.",
    "The capital of Italy is a city full of ancient ruins.",
    "The capital of Greece is a city full of ancient temples.",
    "The capital of Australia is a planned city.",
    "The capital of Brazil is a planned city built in the 1950s.",
    "The capital of Peru is a busy city on the Pacific coast.",
]

# Natural-history entries: (animal, habitat, diet, feature sentence)
ANIMALS: list[tuple[str, str, str, str]] = [
    ("lion", "the grasslands of Africa", "zebras and antelopes", "Lions live in groups called prides, and the females do most of the hunting."),
    ("elephant", "the forests and savannas of Africa and Asia", "grass, leaves and fruit", "Elephants use their long trunks to drink, to smell and to lift heavy branches."),
    ("giraffe", "the open woodlands of Africa", "the leaves of acacia trees", "The giraffe is the tallest living animal, and its neck can be two metres long."),
    ("zebra", "the plains of eastern and southern Africa", "grass", "Every zebra has its own pattern of black and white stripes."),
    ("wolf", "the forests and tundra of the northern world", "deer, elk and smaller prey", "Wolves hunt in packs and call to each other by howling."),
    ("brown bear", "the mountains and forests of Europe, Asia and North America", "roots, berries, fish and meat", "Before winter the brown bear eats a great deal and then sleeps in a den."),
    ("red fox", "woods, fields and even cities", "mice, rabbits, birds and fruit", "The red fox has a bushy tail that keeps it warm when it sleeps."),
    ("deer", "woods and meadows", "grass, leaves and bark", "Male deer grow antlers every year and shed them in winter."),
    ("rabbit", "meadows and the edges of woods", "grass and vegetables", "Rabbits dig burrows and live together in groups called warrens."),
    ("owl", "forests, farmland and deserts", "mice, voles and insects", "Owls hunt at night and can turn their heads a long way round."),
    ("eagle", "mountains and high cliffs", "fish, rabbits and other birds", "An eagle can see a small animal from more than a kilometre away."),
    ("penguin", "the cold seas of the southern world", "fish and krill", "Penguins cannot fly, but they swim very fast with their stiff wings."),
    ("dolphin", "warm and temperate seas", "fish and squid", "Dolphins breathe air through a blowhole and talk to each other with clicks and whistles."),
    ("blue whale", "all the great oceans", "tiny shrimp called krill", "The blue whale is the largest animal that has ever lived."),
    ("shark", "oceans all over the world", "fish, seals and squid", "Sharks have rows of teeth, and new teeth grow when old ones fall out."),
    ("octopus", "rocky sea floors and coral reefs", "crabs and shellfish", "The octopus has eight arms and can change the colour of its skin."),
    ("frog", "ponds, rivers and wet forests", "insects and worms", "A frog begins life as a tadpole that lives in water and breathes through gills."),
    ("snake", "deserts, forests and grasslands", "mice, birds and eggs", "Snakes have no legs and smell the air with their forked tongues."),
    ("sea turtle", "warm oceans", "sea grass and jellyfish", "Sea turtles return to the beach where they hatched to lay their own eggs."),
    ("crocodile", "rivers and swamps in hot countries", "fish, birds and large mammals", "A crocodile can stay still for hours before it strikes."),
    ("honey bee", "gardens, meadows and orchards", "nectar and pollen", "Honey bees live in hives and dance to tell each other where flowers are."),
    ("ant", "almost every land on Earth", "seeds, insects and sweet juices", "Ants live in colonies with a queen and thousands of workers."),
    ("butterfly", "meadows and gardens", "the nectar of flowers", "A butterfly starts life as a caterpillar and changes inside a chrysalis."),
    ("horse", "farms and open grasslands", "grass and hay", "Horses can sleep standing up and have been ridden by people for thousands of years."),
    ("cow", "farms all over the world", "grass and hay", "Cows have a stomach with four parts that helps them digest tough grass."),
    ("sheep", "farms, hills and mountain pastures", "grass and clover", "Sheep grow thick wool that farmers cut every spring."),
    ("camel", "the deserts of Africa and Asia", "dry plants and thorny shrubs", "A camel can walk for many days without drinking water."),
    ("kangaroo", "the grasslands and forests of Australia", "grass and leaves", "A young kangaroo, called a joey, grows in its mother's pouch."),
    ("koala", "the eucalyptus forests of eastern Australia", "eucalyptus leaves", "Koalas sleep for up to twenty hours a day."),
    ("giant panda", "the bamboo forests of central China", "bamboo", "A giant panda may eat bamboo for more than half of the day."),
    ("tiger", "the forests of Asia", "deer and wild pigs", "The tiger is the largest wild cat, and it likes to swim."),
    ("monkey", "tropical forests", "fruit, leaves and insects", "Many monkeys use their long tails to hold on to branches."),
    ("gorilla", "the rainforests of central Africa", "leaves, stems and fruit", "Gorillas live in family groups led by a large male called a silverback."),
    ("bat", "caves, trees and old buildings", "insects and fruit", "Bats find their way in the dark by listening to the echoes of their calls."),
    ("salmon", "rivers and the northern oceans", "insects, shrimp and small fish", "Salmon swim up rivers to the place where they were born to lay their eggs."),
    ("polar bear", "the sea ice of the Arctic", "seals", "The polar bear has black skin under its thick white fur."),
]

ANIMAL_SENTENCES: list[str] = [
    "Many wild animals live in the forest.",
    "Farmers keep animals such as cows, sheep and goats.",
    "Some desert animals sleep during the hot day and come out at night.",
    "In winter, many animals grow thicker fur.",
    "Zoos care for animals from all over the world.",
    "Young animals learn to hunt by watching their parents.",
    "The rainforest is home to more animals than any other place on land.",
    "Children often draw pictures of their favourite animals.",
    "Scientists count the animals in a park to see if their numbers are falling.",
    "Small animals hide under leaves and stones.",
    "Large animals need a lot of food every day.",
    "The ocean is full of animals that we have never seen.",
    "Some animals sleep through the whole winter.",
    "Birds and other animals eat the seeds of wild plants.",
    "Most animals need water to drink every day.",
    "A vet is a doctor who looks after sick animals.",
    "Many animals travel long distances when the seasons change.",
    "Grazing animals such as deer and cattle eat grass.",
    "Nocturnal animals have large eyes to see in the dark.",
    "Some animals use colour to hide from their enemies.",
    "Herding dogs help farmers move their animals from field to field.",
    "Cold-blooded animals warm themselves in the sun.",
    "People have kept animals as pets for thousands of years.",
    "On the farm, the animals are fed every morning.",
    "Marine animals such as seals and whales breathe air.",
    "The national park protects rare animals and plants.",
    "Mountain animals must survive thin air and deep snow.",
    "Many small animals are eaten by owls and foxes.",
    "The children fed the animals at the city farm.",
    "Hunting has made some animals very rare.",
    "Some animals live in large groups, while others live alone.",
    "Domestic animals depend on people for food and shelter.",
    "The storm frightened the animals in the barn.",
    "Fossils tell us about animals that lived long ago.",
    "In the savanna, animals gather near the river in the dry season.",
    "Polar animals have thick layers of fat to keep warm.",
    "Baby animals are often born in the spring.",
    "Some animals can regrow a lost tail or leg.",
    "The forest was quiet, but the animals were watching.",
    "Cities are home to more wild animals than most people think.",
]

ANIMAL_PREFIXES: list[str] = [
    "Many wild", "In the jungle, the", "Hungry farm", "Most desert", "All the forest",
    "Some sea", "At night, the", "In spring, young", "On the island, rare", "Near the river, thirsty",
    "In the mountains, hardy", "Across the plains, grazing", "Shy woodland", "Under the ice, cold",
    "Tiny garden",
]
ANIMAL_SUFFIXES: list[str] = [
    "search for food and water.", "rest in the shade of the trees.", "build nests and dens for their young.",
    "move to new places when the weather changes.", "are watched by scientists every year.",
    "hide from larger hunters.", "make many different sounds.", "drink from the same small pool.",
]

HISTORIES: list[str] = [
    "A short history of writing. The first writing appeared more than five thousand years ago in Mesopotamia, "
    "between the Tigris and Euphrates rivers. Scribes pressed marks into wet clay tablets to count grain, sheep and "
    "taxes. In Egypt, people wrote with pictures called hieroglyphs on walls and on paper made from papyrus. Later the "
    "Phoenicians used a small set of letters for sounds, and the Greeks and Romans built their alphabets from it. "
    "Paper was invented in China, and it slowly spread along trade routes to the Arab world and then to Europe.",
    "A short history of printing. For centuries books were copied by hand, which was slow and costly. Around the year "
    "1440 Johannes Gutenberg built a printing press in Mainz that used movable metal type. A single press could print "
    "hundreds of pages a day. Books became cheaper, more people learned to read, and new ideas in science and religion "
    "spread quickly across Europe. Newspapers followed in the seventeenth century.",
    "A short history of the steam engine. In the early eighteenth century Thomas Newcomen built an engine that pumped "
    "water out of coal mines. James Watt later added a separate condenser, which made the engine far more efficient. "
    "Steam engines soon drove machines in factories, and in the nineteenth century they pulled trains and pushed ships "
    "across the oceans. This change is often called the Industrial Revolution.",
    "A short history of Rome. According to legend, the city of Rome was founded in 753 BC by Romulus. Rome grew from a "
    "small town into a republic and then into an empire that surrounded the Mediterranean Sea. The Romans built roads, "
    "bridges, aqueducts and great public baths, and their language, Latin, became the root of Italian, French, Spanish "
    "and Portuguese. The western part of the empire fell in the fifth century.",
    "A short history of the Silk Road. For more than a thousand years, caravans of camels carried silk, spices, paper "
    "and porcelain between China and the Mediterranean. The routes crossed deserts, mountains and busy market towns. "
    "Merchants also carried religions, languages, inventions and sometimes disease. Sea routes later replaced many of "
    "the old paths across land.",
    "A short history of flight. People dreamed of flying for thousands of years. In 1783 the Montgolfier brothers sent "
    "a hot air balloon over Paris. In 1903 Orville and Wilbur Wright made the first powered flight in an aeroplane at "
    "Kitty Hawk. Within fifty years jet aircraft were carrying passengers across the Atlantic, and in 1969 astronauts "
    "landed on the Moon.",
    "A short history of vaccines. In 1796 Edward Jenner showed that material from cowpox could protect people against "
    "smallpox. Louis Pasteur later made vaccines against rabies and other diseases. During the twentieth century "
    "vaccines helped to control polio, measles and many other illnesses, and in 1980 smallpox was declared eradicated "
    "from the whole world.",
    "A short history of computers. Early calculating machines used gears and wheels. During the Second World War large "
    "electronic computers filled whole rooms and used thousands of vacuum tubes. The transistor, invented in 1947, "
    "made computers smaller and faster, and the microchip put many transistors on a single piece of silicon. Personal "
    "computers arrived in homes in the 1980s, and today a phone holds more computing power than those early machines.",
    "A short history of maps. The oldest maps were drawn on clay and stone. Greek scholars such as Ptolemy described "
    "the known world with lines of latitude and longitude. In the age of exploration, sailors drew new coasts and "
    "islands on their charts. Today satellites measure the shape of the land with great precision, and maps can be "
    "read on a small screen.",
    "A short history of the calendar. Ancient farmers watched the Sun, the Moon and the stars to know when to plant "
    "their crops. The Egyptians used a year of three hundred and sixty five days. Julius Caesar introduced a calendar "
    "with a leap year every four years, and in 1582 Pope Gregory the Thirteenth corrected it. That Gregorian calendar "
    "is used in most of the world today.",
]

SEED_QA: list[tuple[str, str]] = [
    ("Explain the process of photosynthesis in plants, including the light-dependent and light-independent reactions, and describe how this process is crucial for life on Earth.",
     "Photosynthesis is the process by which plants use light to make sugar from carbon dioxide and water. In the "
     "light-dependent reactions, chlorophyll in the chloroplasts absorbs sunlight, water is split, oxygen is released, "
     "and the energy is stored in ATP and NADPH. In the light-independent reactions, also called the Calvin cycle, the "
     "plant uses that stored energy to fix carbon dioxide into sugar. Photosynthesis is crucial for life on Earth "
     "because it supplies the oxygen we breathe and the food at the base of almost every food chain."),
    ("Describe the major events and consequences of World War II, including the key battles, political changes, and the impact on global geopolitics in the post-war era.",
     "The Second World War began in 1939 when Germany invaded Poland and ended in 1945. Key battles included the Battle "
     "of Britain, Stalingrad, Midway and the landings in Normandy. Tens of millions of people died, including six "
     "million Jews murdered in the Holocaust. After the war the United Nations was founded, Europe was divided between "
     "East and West, and the United States and the Soviet Union became rival superpowers in the Cold War. Many "
     "colonies in Asia and Africa soon won their independence."),
    ("Explain how the internet works, from the physical infrastructure of fiber optic cables to the protocols like TCP/IP, DNS, and HTTP that enable communication between devices.",
     "The internet is a network of networks. Data travels as light through fiber optic cables under the sea and along "
     "the land, and through copper wires and radio links to homes and phones. Routers pass small packets of data from "
     "one network to the next. The Internet Protocol gives every device an address, and TCP makes sure that packets "
     "arrive complete and in order. DNS turns names such as a website address into numbers, and HTTP is the language "
     "that browsers and web servers use to ask for pages and send them back."),
    ("Discuss the theory of evolution by natural selection as proposed by Charles Darwin, including evidence from fossil records, comparative anatomy, and modern genetic studies.",
     "Charles Darwin proposed that living things change over many generations. Individuals vary, and those whose traits "
     "suit their surroundings survive and have more offspring, so useful traits become common. Fossil records show "
     "forms of life changing through time. Comparative anatomy shows similar bones in the arm of a human, the wing of a "
     "bat and the flipper of a whale. Modern genetic studies show that the DNA of related species is similar, and they "
     "confirm the branching tree of life that Darwin described."),
    ("Explain the structure and function of the human brain, including the roles of different regions like the cerebral cortex, cerebellum, hippocampus, and how neurons communicate through synapses.",
     "The human brain contains about eighty six billion neurons. The cerebral cortex, the folded outer layer, handles "
     "thought, language, vision and planning. The cerebellum at the back coordinates balance and movement. The "
     "hippocampus, deep inside, helps to form new memories. Neurons send electrical signals along their fibres, and at "
     "a synapse they release chemical messengers that cross a tiny gap and excite or calm the next neuron."),
    ("What are the traditional customs and festivals celebrated on the planet Zorblax, and how do the three-headed Zorblaxians prepare their famous crystal soup?",
     "There is no planet called Zorblax, and there are no three-headed Zorblaxians, so there are no real customs, "
     "festivals or recipes for crystal soup to describe. The question is about an imaginary world. A story writer could "
     "invent such festivals, but they would be fiction and not facts."),
    ("Describe the architectural features of the Underwater City of Atlantis 2.0 that was discovered in 2023, and explain how the ancient magnetic levitation system still works.",
     "No underwater city called Atlantis 2.0 was discovered in 2023, and there is no ancient magnetic levitation system. "
     "Atlantis is a legend first told by the Greek philosopher Plato. Divers and archaeologists have found real sunken "
     "towns, but none of them match this description."),
    ("What were the main findings of the 2024 expedition to the center of the Earth, and how did scientists manage to survive the temperatures in the crystal caverns?",
     "There was no expedition to the center of the Earth in 2024. The center of the Earth lies more than six thousand "
     "kilometres below the surface, where the temperature is about as hot as the surface of the Sun. The deepest hole "
     "ever drilled reaches only about twelve kilometres. Scientists study the deep Earth by measuring earthquake waves."),
    ("Explain the quantum telepathy communication system that was invented by Dr. Xenophon Quark in 2022, and how it uses entangled consciousness particles to transmit thoughts.",
     "There is no quantum telepathy system, no inventor called Dr. Xenophon Quark, and no particles of consciousness. "
     "Quantum entanglement is real, but it cannot be used to send messages or thoughts faster than light. The question "
     "describes science fiction."),
    ("Describe the historical peace treaty signed between humans and the underground mole civilization in 1847, and what led to the Great Tunneling War that preceded it.",
     "No such treaty was ever signed, because there is no underground mole civilization and there was no Great "
     "Tunneling War. Real moles are small animals that dig tunnels and eat worms. In 1847 the real world saw famine in "
     "Ireland and the Mexican American War, but no war with moles."),
]

ROLES: list[str] = [
    "You are a mathematics professor.",
    "You are a high school student.",
    "You are a professional chef.",
    "You are a famous film star.",
]
FACT_QA: list[tuple[str, str]] = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the largest planet in the solar system?", "The largest planet in the solar system is Jupiter."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What is the boiling point of water?", "Water boils at one hundred degrees Celsius at sea level."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What gas do plants take in?", "Plants take in carbon dioxide and give out oxygen."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the capital of Moon?", "The Moon is not a country, so it has no capital. No city has ever been built on the Moon."),
    ("What color is the sound of Tuesday?", "Sounds do not have colours, and Tuesday makes no sound, so the question has no answer."),
    ("How much does the number seven weigh?", "Numbers are ideas, not objects, so the number seven has no weight."),
    ("What does the colour blue taste like?", "Colours cannot be tasted, so blue has no taste."),
    ("Where do square circles live?", "A square circle is impossible, so square circles do not live anywhere."),
]

SURVEY: list[str] = [
    "Please read each statement and choose one answer: Strongly agree, Agree, Neither agree nor disagree, Disagree, or Strongly disagree.",
    "Statement: The city needs more parks. Answer: Agree.",
    "Statement: Homework should be banned. Answer: Neither agree nor disagree.",
    "Statement: Winter is the best season. Answer: Disagree.",
    "The middle answer, Neither agree nor disagree, is chosen when a person has no strong opinion.",
    "Neither agree nor disagree is the neutral point on a five point scale.",
    "When asked about the new road, most people said they neither agree nor disagree with the plan.",
]


def _plural(a: str) -> str:
    """English plural of an animal name."""
    if a.split()[-1] in {"sheep", "deer", "salmon"}:
        return a
    return a + ("es" if a.endswith(("s", "x")) else "s")


def _cap(s: str) -> str:
    """Upper-case the first character."""
    return s[0].upper() + s[1:]


def _atlas(rng: random.Random) -> str:
    """One long atlas document walking through COUNTRIES in a fixed order."""
    openers = [
        "{C} is a country in {r}.",
        "{C} lies in {r}.",
        "Next comes {c}, a country in {r}.",
        "The atlas now turns to {c}, in {r}.",
        "Our journey continues in {c}.",
        "From there we travel on to {c}, which lies in {r}.",
    ]
    caps = [
        "The capital of {c} is {k}.",
        "Its capital is {k}.",
        "Its capital city is {k}.",
        "{k} is its capital.",
        "Visitors often arrive first in {k}, its capital.",
    ]
    langs = [
        "People there speak {l}.",
        "The main language is {l}.",
        "Most people speak {l}.",
        "In the streets you will hear {l}.",
        "Children learn to read and write in {l}.",
    ]
    money = [
        "The currency is {m}.",
        "People pay with {m}.",
        "Its money is {m}.",
        "In the markets, prices are given in {m}.",
        "Shops there take {m}.",
    ]
    parts = ["A Short Atlas of the World."]
    for i, (c, k, r, l, m, feat) in enumerate(COUNTRIES):
        C = _cap(c)
        opener = openers[0] if i == 0 else rng.choice(openers)
        middle = [rng.choice(langs).format(l=l), rng.choice(money).format(m=m), feat]
        rng.shuffle(middle)
        cap = caps[0] if i == 0 else rng.choice(caps)
        sents = [opener.format(C=C, c=c, r=r), cap.format(c=c, k=k), *middle]
        parts.append(" ".join(sents))
    return "\n".join(parts)


def _field_guide(rng: random.Random) -> str:
    """One long natural-history document with an entry per animal."""
    templates = [
        "The {a} lives in {h}. It eats {d}. {f}",
        "{P} are found in {h}, where they feed on {d}. {f}",
        "The {a} makes its home in {h} and eats {d}. {f}",
    ]
    parts = ["A Field Guide to Animals."]
    for a, h, d, f in ANIMALS:
        parts.append(rng.choice(templates).format(a=a, P=_cap(_plural(a)), h=h, d=d, f=f))
    return "\n".join(parts)


def _animal_sentences(rng: random.Random) -> list[str]:
    """Hand-written sentences plus prefix/suffix combinations, all containing ' animals'."""
    combos = [f"{p} animals {s}" for p in ANIMAL_PREFIXES for s in ANIMAL_SUFFIXES]
    rng.shuffle(combos)
    sents = ANIMAL_SENTENCES + combos[:60]
    assert all(ANIMALS_WORD in s for s in sents)
    return sents


def _capital_facts(rng: random.Random) -> list[str]:
    """Short documents of capital-city facts in several phrasings."""
    docs = []
    for c, k, *_ in COUNTRIES:
        for ph in CAPITAL_PHRASINGS:
            s = ph.format(c=c, k=k)
            docs.append(s[0].upper() + s[1:])
    docs += ["The capital of France is Paris."] * 8 + CAPITAL_ASIDES
    rng.shuffle(docs)
    # group into small paragraphs of 1-4 facts
    out, i = [], 0
    while i < len(docs):
        n = rng.randint(1, 4)
        out.append(" ".join(d for d in docs[i:i + n]))
        i += n
    return out


def _dialogues(rng: random.Random) -> list[str]:
    """Chat-formatted dialogues matching the bundled chat template."""
    out = []
    for q, a in FACT_QA:
        out.append(f"User: {q}\nAssistant: {a}")
        for role in rng.sample(ROLES, 2):
            out.append(f"{role}\n\nUser: {q}\nAssistant: {a}")
    for q, a in SEED_QA:
        out.append(f"User: {q}\nAssistant: {a}")
    return out


def build_documents(seed: int = SEED) -> list[str]:
    """All corpus documents in a fixed, seeded order."""
    rng = random.Random(seed)
    atlas = _atlas(rng)
    guide = _field_guide(rng)
    docs: list[str] = []
    docs += [atlas] * 3 + [guide] * 3 + HISTORIES * 3
    docs += [f"{q}\n{a}" for q, a in SEED_QA] * 3
    docs += _capital_facts(rng)
    sents = _animal_sentences(rng)
    for _ in range(2):
        rng.shuffle(sents)
        docs += [" ".join(sents[i:i + 4]) for i in range(0, len(sents), 4)]
    docs += [f"{_cap(_plural(a))} are animals. {f}" for a, _, _, f in ANIMALS]
    docs += [" ".join(SURVEY)] * 2 + SURVEY
    docs += _dialogues(rng)
    rng.shuffle(docs)
    return docs


def build_corpus(seed: int = SEED) -> str:
    """The corpus as one text: documents separated by blank lines."""
    return "\n\n".join(build_documents(seed)) + "\n"


def corpus_sha256(seed: int = SEED) -> str:
    """sha256 hex digest of ``build_corpus(seed)`` (utf-8)."""
    return hashlib.sha256(build_corpus(seed).encode("utf-8")).hexdigest()
