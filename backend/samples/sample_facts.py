"""The knowledge tables ``make_sample`` writes the shipped instruction sample from: countries,
planets, elements, animals, units, programming concepts and the small word lists of the
templates, with their Korean and Japanese names. Answers are computed from these, so they are
correct by construction."""

from __future__ import annotations

CATEGORIES = (
    "open_qa",
    "closed_qa",
    "classification",
    "information_extraction",
    "summarization",
    "brainstorming",
    "creative_writing",
    "general_qa",
)

# Knowledge tables ---------------------------------------------------------------------------

# (English name as used mid-sentence, capital, continent, currency,
#  Korean name, Korean capital, Korean continent, Japanese name, Japanese capital, Japanese continent)
COUNTRIES = [
    ("France", "Paris", "Europe", "euro", "프랑스", "파리", "유럽", "フランス", "パリ", "ヨーロッパ"),
    ("Germany", "Berlin", "Europe", "euro", "독일", "베를린", "유럽", "ドイツ", "ベルリン", "ヨーロッパ"),
    ("Italy", "Rome", "Europe", "euro", "이탈리아", "로마", "유럽", "イタリア", "ローマ", "ヨーロッパ"),
    ("Spain", "Madrid", "Europe", "euro", "스페인", "마드리드", "유럽", "スペイン", "マドリード", "ヨーロッパ"),
    ("Portugal", "Lisbon", "Europe", "euro", "포르투갈", "리스본", "유럽", "ポルトガル", "リスボン", "ヨーロッパ"),
    ("Greece", "Athens", "Europe", "euro", "그리스", "아테네", "유럽", "ギリシャ", "アテネ", "ヨーロッパ"),
    ("Austria", "Vienna", "Europe", "euro", "오스트리아", "빈", "유럽", "オーストリア", "ウィーン", "ヨーロッパ"),
    ("Ireland", "Dublin", "Europe", "euro", "아일랜드", "더블린", "유럽", "アイルランド", "ダブリン", "ヨーロッパ"),
    ("Finland", "Helsinki", "Europe", "euro", "핀란드", "헬싱키", "유럽", "フィンランド", "ヘルシンキ", "ヨーロッパ"),
    ("Poland", "Warsaw", "Europe", "Polish złoty", "폴란드", "바르샤바", "유럽", "ポーランド", "ワルシャワ", "ヨーロッパ"),
    ("Hungary", "Budapest", "Europe", "Hungarian forint", "헝가리", "부다페스트", "유럽", "ハンガリー", "ブダペスト", "ヨーロッパ"),
    ("Norway", "Oslo", "Europe", "Norwegian krone", "노르웨이", "오슬로", "유럽", "ノルウェー", "オスロ", "ヨーロッパ"),
    ("Sweden", "Stockholm", "Europe", "Swedish krona", "스웨덴", "스톡홀름", "유럽", "スウェーデン", "ストックホルム", "ヨーロッパ"),
    ("Denmark", "Copenhagen", "Europe", "Danish krone", "덴마크", "코펜하겐", "유럽", "デンマーク", "コペンハーゲン", "ヨーロッパ"),
    ("the United Kingdom", "London", "Europe", "pound sterling", "영국", "런던", "유럽", "イギリス", "ロンドン", "ヨーロッパ"),
    ("Japan", "Tokyo", "Asia", "Japanese yen", "일본", "도쿄", "아시아", "日本", "東京", "アジア"),
    ("South Korea", "Seoul", "Asia", "South Korean won", "한국", "서울", "아시아", "韓国", "ソウル", "アジア"),
    ("China", "Beijing", "Asia", "renminbi", "중국", "베이징", "아시아", "中国", "北京", "アジア"),
    ("India", "New Delhi", "Asia", "Indian rupee", "인도", "뉴델리", "아시아", "インド", "ニューデリー", "アジア"),
    ("Thailand", "Bangkok", "Asia", "Thai baht", "태국", "방콕", "아시아", "タイ", "バンコク", "アジア"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese dong", "베트남", "하노이", "아시아", "ベトナム", "ハノイ", "アジア"),
    ("the Philippines", "Manila", "Asia", "Philippine peso", "필리핀", "마닐라", "아시아", "フィリピン", "マニラ", "アジア"),
    ("Egypt", "Cairo", "Africa", "Egyptian pound", "이집트", "카이로", "아프리카", "エジプト", "カイロ", "アフリカ"),
    ("Kenya", "Nairobi", "Africa", "Kenyan shilling", "케냐", "나이로비", "아프리카", "ケニア", "ナイロビ", "アフリカ"),
    ("Nigeria", "Abuja", "Africa", "Nigerian naira", "나이지리아", "아부자", "아프리카", "ナイジェリア", "アブジャ", "アフリカ"),
    ("Ghana", "Accra", "Africa", "Ghanaian cedi", "가나", "아크라", "아프리카", "ガーナ", "アクラ", "アフリカ"),
    ("Ethiopia", "Addis Ababa", "Africa", "Ethiopian birr", "에티오피아", "아디스아바바", "아프리카", "エチオピア", "アディスアベバ", "アフリカ"),
    ("Morocco", "Rabat", "Africa", "Moroccan dirham", "모로코", "라바트", "아프리카", "モロッコ", "ラバト", "アフリカ"),
    ("Canada", "Ottawa", "North America", "Canadian dollar", "캐나다", "오타와", "북아메리카", "カナダ", "オタワ", "北アメリカ"),
    ("Mexico", "Mexico City", "North America", "Mexican peso", "멕시코", "멕시코시티", "북아메리카", "メキシコ", "メキシコシティ", "北アメリカ"),
    ("Cuba", "Havana", "North America", "Cuban peso", "쿠바", "아바나", "북아메리카", "キューバ", "ハバナ", "北アメリカ"),
    ("Brazil", "Brasília", "South America", "Brazilian real", "브라질", "브라질리아", "남아메리카", "ブラジル", "ブラジリア", "南アメリカ"),
    ("Argentina", "Buenos Aires", "South America", "Argentine peso", "아르헨티나", "부에노스아이레스", "남아메리카", "アルゼンチン", "ブエノスアイレス", "南アメリカ"),
    ("Chile", "Santiago", "South America", "Chilean peso", "칠레", "산티아고", "남아메리카", "チリ", "サンティアゴ", "南アメリカ"),
    ("Peru", "Lima", "South America", "Peruvian sol", "페루", "리마", "남아메리카", "ペルー", "リマ", "南アメリカ"),
    ("Colombia", "Bogotá", "South America", "Colombian peso", "콜롬비아", "보고타", "남아메리카", "コロンビア", "ボゴタ", "南アメリカ"),
    ("Australia", "Canberra", "Oceania", "Australian dollar", "호주", "캔버라", "오세아니아", "オーストラリア", "キャンベラ", "オセアニア"),
    ("New Zealand", "Wellington", "Oceania", "New Zealand dollar", "뉴질랜드", "웰링턴", "오세아니아", "ニュージーランド", "ウェリントン", "オセアニア"),
]

# (name, kind, facts (three short clauses), one-sentence summary, Korean name, Japanese name)
PLANETS = [
    ("Mercury", "rocky planet",
     ["It is the smallest planet in the Solar System and the closest one to the Sun.",
      "It has almost no atmosphere, so its surface is scorching by day and freezing at night.",
      "A year on Mercury lasts only about 88 Earth days."],
     "Mercury is the smallest planet and the closest to the Sun, with almost no atmosphere and a year of about 88 Earth days.",
     "수성", "水星"),
    ("Venus", "rocky planet",
     ["It is the hottest planet because its thick carbon dioxide atmosphere traps heat.",
      "It spins in the opposite direction to most of the other planets.",
      "It is similar in size to Earth and is often called Earth's twin."],
     "Venus is an Earth-sized planet that spins backwards and is the hottest planet because its thick atmosphere traps heat.",
     "금성", "金星"),
    ("Earth", "rocky planet",
     ["It is the only planet known to support life.",
      "About 71 percent of its surface is covered by water.",
      "It has one natural satellite, the Moon."],
     "Earth is the only planet known to host life; most of its surface is water and it has one moon.",
     "지구", "地球"),
    ("Mars", "rocky planet",
     ["It is called the Red Planet because iron oxide dust gives its surface a reddish color.",
      "It has Olympus Mons, the tallest volcano in the Solar System.",
      "It has two small moons named Phobos and Deimos."],
     "Mars, the Red Planet, has reddish iron oxide dust, the tallest volcano in the Solar System and two small moons.",
     "화성", "火星"),
    ("Jupiter", "gas giant",
     ["It is the largest planet in the Solar System.",
      "Its Great Red Spot is a giant storm that is wider than Earth.",
      "It is made mostly of hydrogen and helium."],
     "Jupiter is the largest planet, a ball of mostly hydrogen and helium with a storm wider than Earth called the Great Red Spot.",
     "목성", "木星"),
    ("Saturn", "gas giant",
     ["It is famous for its bright rings, which are made of ice and rock.",
      "It is the second-largest planet in the Solar System.",
      "Its average density is lower than that of water."],
     "Saturn is the second-largest planet, known for its rings of ice and rock and for a density lower than water's.",
     "토성", "土星"),
    ("Uranus", "ice giant",
     ["It rotates on its side, with its axis tilted by about 98 degrees.",
      "Methane in its atmosphere makes it look blue-green.",
      "William Herschel discovered it with a telescope in 1781."],
     "Uranus is a blue-green ice giant that rotates on its side and was discovered by William Herschel in 1781.",
     "천왕성", "天王星"),
    ("Neptune", "ice giant",
     ["It is the farthest planet from the Sun.",
      "It has the fastest winds measured on any planet in the Solar System.",
      "It was found in 1846 after mathematicians predicted where it should be."],
     "Neptune is the farthest planet from the Sun, has the fastest winds in the Solar System and was found in 1846 from a mathematical prediction.",
     "해왕성", "海王星"),
]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
KO_ORDINALS = ["첫", "두", "세", "네", "다섯", "여섯", "일곱", "여덟"]

# (name, symbol, atomic number, kind, state at room temperature, Korean name, Japanese name)
ELEMENTS = [
    ("hydrogen", "H", 1, "nonmetal", "gas", "수소", "水素"),
    ("helium", "He", 2, "noble gas", "gas", "헬륨", "ヘリウム"),
    ("lithium", "Li", 3, "metal", "solid", "리튬", "リチウム"),
    ("boron", "B", 5, "metalloid", "solid", "붕소", "ホウ素"),
    ("carbon", "C", 6, "nonmetal", "solid", "탄소", "炭素"),
    ("nitrogen", "N", 7, "nonmetal", "gas", "질소", "窒素"),
    ("oxygen", "O", 8, "nonmetal", "gas", "산소", "酸素"),
    ("fluorine", "F", 9, "nonmetal", "gas", "플루오린", "フッ素"),
    ("neon", "Ne", 10, "noble gas", "gas", "네온", "ネオン"),
    ("sodium", "Na", 11, "metal", "solid", "나트륨", "ナトリウム"),
    ("magnesium", "Mg", 12, "metal", "solid", "마그네슘", "マグネシウム"),
    ("aluminum", "Al", 13, "metal", "solid", "알루미늄", "アルミニウム"),
    ("silicon", "Si", 14, "metalloid", "solid", "규소", "ケイ素"),
    ("phosphorus", "P", 15, "nonmetal", "solid", "인", "リン"),
    ("sulfur", "S", 16, "nonmetal", "solid", "황", "硫黄"),
    ("chlorine", "Cl", 17, "nonmetal", "gas", "염소", "塩素"),
    ("argon", "Ar", 18, "noble gas", "gas", "아르곤", "アルゴン"),
    ("potassium", "K", 19, "metal", "solid", "칼륨", "カリウム"),
    ("calcium", "Ca", 20, "metal", "solid", "칼슘", "カルシウム"),
    ("iron", "Fe", 26, "metal", "solid", "철", "鉄"),
    ("copper", "Cu", 29, "metal", "solid", "구리", "銅"),
    ("zinc", "Zn", 30, "metal", "solid", "아연", "亜鉛"),
    ("bromine", "Br", 35, "nonmetal", "liquid", "브로민", "臭素"),
    ("krypton", "Kr", 36, "noble gas", "gas", "크립톤", "クリプトン"),
    ("silver", "Ag", 47, "metal", "solid", "은", "銀"),
    ("tin", "Sn", 50, "metal", "solid", "주석", "スズ"),
    ("iodine", "I", 53, "nonmetal", "solid", "아이오딘", "ヨウ素"),
    ("gold", "Au", 79, "metal", "solid", "금", "金"),
    ("mercury", "Hg", 80, "metal", "liquid", "수은", "水銀"),
    ("lead", "Pb", 82, "metal", "solid", "납", "鉛"),
    ("uranium", "U", 92, "metal", "solid", "우라늄", "ウラン"),
]
# Korean names that read as grammatical particles ("silver", "phosphorus"): not used alone.
KO_AMBIGUOUS = {"은", "인"}

CLASSES = {  # English class -> (plural, Korean, Japanese)
    "mammal": ("mammals", "포유류", "哺乳類"),
    "bird": ("birds", "조류", "鳥類"),
    "reptile": ("reptiles", "파충류", "爬虫類"),
    "amphibian": ("amphibians", "양서류", "両生類"),
    "fish": ("fish", "어류", "魚類"),
    "insect": ("insects", "곤충", "昆虫"),
}
# (English, class, Korean, Japanese)
ANIMALS = [
    ("whale", "mammal", "고래", "クジラ"), ("dolphin", "mammal", "돌고래", "イルカ"),
    ("bat", "mammal", "박쥐", "コウモリ"), ("elephant", "mammal", "코끼리", "ゾウ"),
    ("lion", "mammal", "사자", "ライオン"), ("kangaroo", "mammal", "캥거루", "カンガルー"),
    ("bear", "mammal", "곰", "クマ"), ("tiger", "mammal", "호랑이", "トラ"),
    ("eagle", "bird", "독수리", "ワシ"), ("penguin", "bird", "펭귄", "ペンギン"),
    ("owl", "bird", "올빼미", "フクロウ"), ("sparrow", "bird", "참새", "スズメ"),
    ("ostrich", "bird", "타조", "ダチョウ"), ("parrot", "bird", "앵무새", "オウム"),
    ("snake", "reptile", "뱀", "ヘビ"), ("crocodile", "reptile", "악어", "ワニ"),
    ("turtle", "reptile", "거북", "カメ"), ("lizard", "reptile", "도마뱀", "トカゲ"),
    ("frog", "amphibian", "개구리", "カエル"), ("salamander", "amphibian", "도롱뇽", "サンショウウオ"),
    ("toad", "amphibian", "두꺼비", "ヒキガエル"),
    ("shark", "fish", "상어", "サメ"), ("salmon", "fish", "연어", "サケ"),
    ("tuna", "fish", "참치", "マグロ"), ("goldfish", "fish", "금붕어", "金魚"),
    ("honeybee", "insect", "꿀벌", "ミツバチ"), ("ant", "insect", "개미", "アリ"),
    ("butterfly", "insect", "나비", "チョウ"), ("dragonfly", "insect", "잠자리", "トンボ"),
]
# Animals people often place in the wrong class: a short reason in each language.
ANIMAL_NOTES = {
    "whale": ("Although it lives in the ocean, it breathes air with lungs and feeds its young with milk.",
              "바다에 살지만 허파로 숨을 쉬고 새끼에게 젖을 먹이기 때문입니다.",
              "海に住んでいますが、肺で呼吸し、子どもを母乳で育てるからです。"),
    "dolphin": ("It lives in the sea, but it breathes air and nurses its calves with milk.",
                "바다에 살지만 공기로 숨을 쉬고 새끼에게 젖을 먹이기 때문입니다.",
                "海で暮らしますが、空気を吸って呼吸し、子どもを母乳で育てるからです。"),
    "bat": ("Even though it can fly, it has fur and feeds its young with milk.",
            "날 수 있지만 털이 있고 새끼에게 젖을 먹이기 때문입니다.",
            "空を飛べますが、毛が生えていて子どもを母乳で育てるからです。"),
    "penguin": ("It cannot fly, but it has feathers and lays eggs like every bird.",
                "날지 못하지만 깃털이 있고 알을 낳기 때문입니다.",
                "空を飛べませんが、羽毛があり卵を産むからです。"),
    "ostrich": ("It is too heavy to fly, but it has feathers, a beak and lays eggs.",
                "너무 무거워 날지 못하지만 깃털과 부리가 있고 알을 낳기 때문입니다.",
                "体が重くて飛べませんが、羽毛とくちばしがあり卵を産むからです。"),
}

# (plural unit, singular unit, smaller unit (plural), factor)
UNITS = [
    ("kilometers", "kilometer", "meters", 1000),
    ("meters", "meter", "centimeters", 100),
    ("kilograms", "kilogram", "grams", 1000),
    ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60),
    ("days", "day", "hours", 24),
    ("weeks", "week", "days", 7),
    ("liters", "liter", "milliliters", 1000),
    ("feet", "foot", "inches", 12),
    ("yards", "yard", "feet", 3),
]
# (Korean big unit, Korean small unit, Japanese big unit, Japanese small unit, factor)
UNITS_CJK = [
    ("킬로미터", "미터", "キロメートル", "メートル", 1000),
    ("미터", "센티미터", "メートル", "センチメートル", 100),
    ("킬로그램", "그램", "キログラム", "グラム", 1000),
    ("시간", "분", "時間", "分", 60),
    ("리터", "밀리리터", "リットル", "ミリリットル", 1000),
]

PROGRAMMING = [
    ("a variable", "A variable is a named place in a program's memory that holds a value, such as a number or a piece of text, which the program can read and change."),
    ("a function", "A function is a named block of code that performs one task; it can take inputs called parameters and return a result, so the same code can be reused in many places."),
    ("a loop", "A loop is a structure that repeats a block of code, either a fixed number of times or until a condition becomes false."),
    ("an array", "An array is an ordered collection of values stored one after another, where each value is reached by its position, called an index."),
    ("recursion", "Recursion is when a function solves a problem by calling itself on a smaller version of the same problem, until it reaches a simple base case."),
    ("a compiler", "A compiler is a program that translates source code written in a programming language into machine code or another lower-level form before the program runs."),
    ("an interpreter", "An interpreter is a program that reads source code and executes it directly, statement by statement, without first producing a separate machine-code file."),
    ("an API", "An API, or application programming interface, is a defined set of functions and rules that lets one piece of software use the services of another."),
    ("a bug", "A bug is a mistake in a program that makes it behave in a way its authors did not intend, such as crashing or giving a wrong answer."),
    ("version control", "Version control is a system, such as Git, that records every change made to a set of files so that people can review history, work in parallel and undo mistakes."),
    ("a class", "A class is a blueprint in object-oriented programming that describes the data and the behavior shared by all objects created from it."),
    ("a boolean", "A boolean is a data type with only two possible values, true and false, used for conditions and logical decisions."),
    ("a string", "A string is a sequence of characters, such as letters, digits and spaces, used to represent text in a program."),
    ("an algorithm", "An algorithm is a precise, step-by-step procedure for solving a problem or performing a task, such as sorting a list of numbers."),
    ("a hash table", "A hash table is a data structure that stores key-value pairs and uses a hash function to find the value for a key very quickly, on average in constant time."),
    ("a stack", "A stack is a collection in which the last item added is the first one removed, like a pile of plates; its main operations are push and pop."),
    ("a queue", "A queue is a collection in which the first item added is the first one removed, like people waiting in line."),
    ("a unit test", "A unit test is a small automated test that checks that one piece of code, such as a single function, behaves as expected."),
    ("a database index", "A database index is an extra data structure that lets a database find rows matching a condition quickly, without scanning the whole table."),
    ("open-source software", "Open-source software is software whose source code is published under a license that lets anyone read, modify and share it."),
]

NAMES = ["Maria", "James", "Aisha", "Kenji", "Sofia", "Liam", "Priya", "Mateo", "Hana", "Oliver",
         "Fatima", "Noah", "Elena", "Ravi", "Chloe", "Daniel", "Mei", "Lucas", "Amara", "Jonas"]
FRUITS = ["apple", "banana", "mango", "strawberry", "grape", "pear", "cherry", "pineapple", "peach", "orange"]
VEGETABLES = ["carrot", "broccoli", "spinach", "potato", "onion", "cabbage", "lettuce", "celery", "cauliflower", "garlic"]
LANGUAGES = ["Python", "Java", "Rust", "Go", "JavaScript", "C++", "Ruby", "Kotlin", "Swift", "Haskell"]
BROWSERS = ["Firefox", "Chrome", "Safari", "Edge", "Opera", "Brave"]
REVIEWS = [
    ("The food was delicious and the staff were friendly.", "positive", "praises the delicious food and the friendly staff"),
    ("I loved this book and could not put it down.", "positive", "says they loved the book and could not stop reading"),
    ("The headphones sound great and the battery lasts all day.", "positive", "praises the sound and the long battery life"),
    ("Our hotel room was clean, quiet and had a beautiful view.", "positive", "describes a clean, quiet room with a beautiful view"),
    ("The movie was funny from start to finish.", "positive", "found the movie funny throughout"),
    ("Delivery was fast and the package arrived in perfect condition.", "positive", "is pleased with the fast delivery and the undamaged package"),
    ("The soup was cold and the waiter ignored us for twenty minutes.", "negative", "complains about cold soup and slow service"),
    ("The phone stopped working after two days.", "negative", "reports that the phone broke after only two days"),
    ("The plot was boring and the ending made no sense.", "negative", "criticizes the boring plot and the confusing ending"),
    ("The train was late again and nobody told us why.", "negative", "is unhappy about the delay and the lack of information"),
    ("These shoes fell apart after one week.", "negative", "complains that the shoes fell apart quickly"),
    ("The app crashes every time I open it.", "negative", "reports that the app crashes constantly"),
]

# Small helpers ------------------------------------------------------------------------------
